"""The measurements behind the README's "why" sentences on this result, rerunnable:

    python results/why.py EXPERIMENT TUNED DEFAULTS > results/NAME/why.json
    python results/why.py experiments/headline/mnist-quick-unseen 936e1b41 5cd2ccf2 > results/mnist-quick-unseen/why.json

For the tuned (first) and the default (second) configuration, on each partition's stage-1
models of the sweep's own seed (read from the sweep's stage-1 store):

- `pseudo_auroc`: how well the stage-1 classifier's max-logit score tells the test IND images
  from 2,000 pseudo-OOD images that the configuration's generator settings decode; `real_auroc`
  is the same for the real OOD test images. Lower than real = the pseudo-OOD images sit closer
  to the IND data than the real OOD do;
- `spearman_vs_maxlogit`: the rank correlation of the configuration's CMG test scores (its saved
  per-image scores) with max-logit's, 1 = CMG orders the test images exactly as max-logit does.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from scipy.stats import spearmanr

from analysis.trial_files import load_scores, load_trial_record
from cmg.config import RunConfig, resolve_family_defaults
from cmg.metrics import maxlogit_score, ood_metrics
from cmg.pipeline import load_partition
from cmg.stage1 import load_stage1_model
from cmg.stage2 import extract_features, pseudo_ood_features
from tune.artifacts import ArtifactStore, stage1_keys

PSEUDO_IMAGES = 2000


def _stage1(record: dict, cfg: RunConfig, partition: int, kind: str, split) -> torch.nn.Module:
    """A stage-1 model of the configuration from the sweep's store."""
    store = ArtifactStore(record["stage1_store"])
    key = getattr(stage1_keys(record["setting"], partition, cfg), kind)
    local = Path(tempfile.gettempdir()) / key / f"{kind}.pt"  # used only for a remote store
    return load_stage1_model(store.get_file(key, f"{kind}.pt", local), kind, split,
                             require_data=False)


@torch.no_grad()
def partition_row(record: dict, cfgs: dict[str, RunConfig], partition: int) -> dict:
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
        pseudo = pseudo_ood_features(classifier, cvae, PSEUDO_IMAGES, s2, s2.sigma,
                                     torch.Generator().manual_seed(s2.seed))
        pseudo_score = maxlogit_score(classifier.head(pseudo), k)
        row[f"{name}_pseudo_auroc"] = ood_metrics(score["ind"], pseudo_score)["auroc"]
    return row


def main(experiment: str, tuned: str, defaults: str) -> list[dict]:
    torch.set_num_threads(1)
    trials = {"tuned": tuned, "defaults": defaults}
    records = {name: load_trial_record(experiment, trial) for name, trial in trials.items()}
    cfgs = {name: RunConfig.from_dict(r["config"]) for name, r in records.items()}
    rows = [partition_row(records["tuned"], cfgs, p) for p in records["tuned"]["partitions"]]
    for name, trial in trials.items():
        scores = load_scores(experiment, trial).query("split == 'test'")
        for row in rows:
            part = scores[scores["partition"] == row["partition"]]
            row[f"{name}_spearman_vs_maxlogit"] = spearmanr(part["cmg"], part["maxlogit"]).statistic
    return rows


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4]), indent=1))
