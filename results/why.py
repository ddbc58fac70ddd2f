"""The measurements behind the README's "why" sentences on this result, rerunnable:

    python results/why.py EXPERIMENT [TUNED DEFAULTS] [--out results/NAME/why.json]
    python results/why.py experiments/headline/mnist-quick-unseen \
        --out results/mnist-quick-unseen/why.json

For the tuned and the default configuration (by default those analysis.headline names from
EXPERIMENT/report/summary.csv: CMG's best on validation, and the sweep's first trial), on each
partition's stage-1 models of the sweep's own seed (read from the sweep's stage-1 store; a model
the store does not hold, on a machine that continued the sweep from its packed records, is
trained here as the sweep's prewarm trained it, once per machine, and said so on stderr):

- `pseudo_auroc`: how well the stage-1 classifier's max-logit score tells the test IND images
  from 2,000 (--pseudo-images) pseudo-OOD images that the configuration's generator settings
  decode; `real_auroc` is the same for the real OOD test images. Lower than real = the
  pseudo-OOD images sit closer to the IND data than the real OOD do;
- `spearman_vs_maxlogit`: the rank correlation of the configuration's CMG test scores (its saved
  per-image scores) with max-logit's, 1 = CMG orders the test images exactly as max-logit does;
  null for a partition whose scores the trial did not save (one stopped early).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr

from analysis.headline import chosen_trials
from analysis.trial_files import load_scores, load_trial_record
from cmg.config import RunConfig, resolve_family_defaults
from cmg.errors import atomic_write, command_parser
from cmg.metrics import maxlogit_score, ood_metrics
from cmg.pipeline import load_partition
from cmg.stage1 import load_stage1_model, train_model
from cmg.stage2 import extract_features, pseudo_ood_features
from tune.artifacts import ArtifactStore, stage1_keys


def _stage1(record: dict, cfg: RunConfig, partition: int, kind: str, split) -> torch.nn.Module:
    """A stage-1 model of the configuration: the sweep's store's, else trained here with the
    prewarm's config and seed (an interrupted training resumes from its last epoch)."""
    store = ArtifactStore(record["stage1_store"])
    key = getattr(stage1_keys(record["setting"], partition, cfg), kind)
    local = Path(tempfile.gettempdir()) / "cmg-why" / key / f"{kind}.pt"
    if store.exists(key, f"{kind}.pt"):
        path = store.get_file(key, f"{kind}.pt", local)  # (a download only from a remote store)
    else:  # a checkpoint an earlier call left here is taken up: finished, nothing trains
        if not local.exists():
            print(f"[why] the store {record['stage1_store']} does not hold {key}: training it "
                  "here", file=sys.stderr, flush=True)
            local.parent.mkdir(parents=True, exist_ok=True)
        with torch.enable_grad():  # (the caller measures under no_grad)
            train_model(kind, split, cfg, "cpu", local, quiet=True)
        path = local
    return load_stage1_model(path, kind, split, require_data=False)


@torch.no_grad()
def partition_row(record: dict, cfgs: dict[str, RunConfig], partition: int,
                  pseudo_images: int) -> dict:
    tuned = cfgs["tuned"]
    split = load_partition(record["setting"], partition, tuned, "cpu", record["data_root"])
    classifier, k = _stage1(record, tuned, partition, "classifier", split), split.num_classes
    ind_x, _, ood_x = split.eval_sets("test")
    score = {part: maxlogit_score(classifier.head(extract_features(classifier, x)), k)
             for part, x in (("ind", ind_x), ("ood", ood_x))}
    row = {"partition": partition, "real_auroc": ood_metrics(score["ind"], score["ood"])["auroc"]}
    for name, cfg in cfgs.items():
        s2 = resolve_family_defaults(cfg, split.family).stage2
        cvae = _stage1(record, cfg, partition, "cvae", split)
        pseudo = pseudo_ood_features(classifier, cvae, pseudo_images, s2, s2.sigma,
                                     torch.Generator().manual_seed(s2.seed))
        pseudo_score = maxlogit_score(classifier.head(pseudo), k)
        row[f"{name}_pseudo_auroc"] = ood_metrics(score["ind"], pseudo_score)["auroc"]
    return row


def _test_scores(experiment: str, trial: str) -> pd.DataFrame:
    """The trial's saved per-image test scores (none of a partition it did not save)."""
    table = load_scores(experiment, trial)
    return (table[table["split"] == "test"] if len(table)
            else pd.DataFrame(columns=["partition", "cmg", "maxlogit"]))


def main(experiment: str, tuned: str, defaults: str, pseudo_images: int = 2000) -> list[dict]:
    torch.set_num_threads(1)
    trials = {"tuned": tuned, "defaults": defaults}
    records = {name: load_trial_record(experiment, trial) for name, trial in trials.items()}
    cfgs = {name: RunConfig.from_dict(r["config"]) for name, r in records.items()}
    scores = {name: _test_scores(experiment, trial) for name, trial in trials.items()}
    partitions = records["tuned"]["partitions"]
    for name, trial in trials.items():
        if missing := sorted(set(partitions) - set(scores[name]["partition"])):
            print(f"[why] {name} trial {trial} has no saved scores of partitions {missing} (a "
                  "trial stopped early; a packed storage keeps only complete trials' scores): "
                  "its spearman_vs_maxlogit there is null", file=sys.stderr, flush=True)
    rows = [partition_row(records["tuned"], cfgs, p, pseudo_images) for p in partitions]
    for name, table in scores.items():
        for row in rows:
            part = table[table["partition"] == row["partition"]]
            row[f"{name}_spearman_vs_maxlogit"] = (
                spearmanr(part["cmg"], part["maxlogit"]).statistic if len(part) else None)
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser("results/why.py", "The measurements behind the README's why "
                            "sentences on a headline sweep, as JSON on stdout (see the source).")
    parser.add_argument("experiment", help="a sweep's folder (CMG's study)")
    parser.add_argument("trials", nargs="*", metavar="TUNED DEFAULTS",
                        help="the two trial ids (default: CMG's best on validation and the "
                             "sweep's first trial, from EXPERIMENT/report/summary.csv)")
    parser.add_argument("--pseudo-images", type=int, default=2000,
                        help="pseudo-OOD images decoded per configuration and partition")
    parser.add_argument("--out", type=Path, help="write the JSON there (default: stdout)")
    args = parser.parse_args(argv)
    if args.pseudo_images < 2:
        parser.error("--pseudo-images must be at least 2")
    if len(args.trials) not in (0, 2):
        parser.error("give both TUNED and DEFAULTS, or neither")
    if not args.trials:
        summary = Path(args.experiment) / "report" / "summary.csv"
        if not summary.exists():
            parser.error(f"{summary} is missing: make the report (python -m analysis.report "
                         f"{args.experiment}) or name TUNED and DEFAULTS")
        args.trials = list(chosen_trials(pd.read_csv(summary, dtype={"trial_id": str})))
    return args


if __name__ == "__main__":
    args = parse()
    text = json.dumps(main(args.experiment, *args.trials, args.pseudo_images), indent=1)
    if args.out is None:
        print(text)
    else:
        with atomic_write(args.out, "w") as handle:  # all of it, or nothing
            handle.write(text + "\n")
