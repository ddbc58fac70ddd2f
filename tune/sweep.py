"""`python -m tune.sweep`: search CMG's hyperparameters with Optuna on Ray Tune, scoring each
configuration by its validation AUROC averaged over the five partitions (Setting 2,
`different_dataset`: over the OOD data sets present, in its single partition).

    python -m tune.sweep --setting same_dataset_mnist --budget quick --num-samples 16
    python -m tune.sweep --setting same_dataset_mnist --name demo --resume   # after a crash

The experiment folder (STORAGE/NAME) holds Tune's state, one folder per trial (params.json,
result.json, checkpoints), the Optuna study (`optuna.journal`, unless --study-storage) and,
at the end, `summary.json` and `report/` (python -m analysis.report: report.md, CSV, Parquet,
PNGs). Stage-1 models live in STORAGE/stage1, shared by every sweep there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cmg.cli import (add_backbone_args, add_compile_arg, add_ood_dataset_arg, backbone_from_args,
                     write_json)
from cmg.config import BASELINES, BUDGETS, budget_config
from cmg.data import get_setting, make_split, resolve_data_root, setting_names
from cmg.errors import OneLineParser, exit_on_usage_error, fail, help_formatter
from tune.space import default_space, first_point, load_space_file, mode_choices


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m tune.sweep", description=__doc__.splitlines()[0][25:],
                      formatter_class=help_formatter)
    p.add_argument("--setting", default="same_dataset_mnist",
                   help=f"data setting: {', '.join(setting_names())}")
    p.add_argument("--mode", default="CMG-energy", help="CMG-energy, CMG-softmax or both")
    p.add_argument("--budget", default="quick", choices=list(BUDGETS), help="work per trial")
    p.add_argument("--num-samples", type=int, default=16, help="configurations to try")
    p.add_argument("--storage", default="experiments",
                   help="folder or pyarrow URI (s3://..., gs://...) for experiments and stage-1 models")
    p.add_argument("--name", default=None, help="experiment name (default: SETTING-MODE-BUDGET)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every model")
    p.add_argument("--space", default=None, help="YAML file that overrides search ranges")
    p.add_argument("--study-storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://... (default: a journal file in "
                        "the experiment folder)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "none"],
                   help="early stopping over partitions")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractions pack trials on a GPU (default: 0.25 when "
                        "GPUs exist, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as resources allow)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial, from its last checkpoint")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. auto or HOST:6379 (default: a local Ray)")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                   help="skip training the default stage-1 models of all partitions in "
                        "parallel before the search")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix any cmg knob for the whole sweep, e.g. --set cvae.epochs=20")
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $CMG_DATA_ROOT, else ./datasets)")
    p.add_argument("--download", action="store_true", help="download missing data first")
    add_ood_dataset_arg(p)
    add_backbone_args(p)
    add_compile_arg(p)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip writing EXPERIMENT/report (python -m analysis.report) at the end")
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    return p


def _join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def _resolve_storage(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _study_storage(url: str | None, experiment: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # bad URL, missing driver, unreachable server
            fail(f"cannot open study storage {url} ({type(err).__name__}); check --study-storage")
    if "://" in experiment:
        fail("--storage is remote: pass --study-storage URL (e.g. postgresql://...) for the study")
    return JournalStorage(JournalFileBackend(os.path.join(experiment, "optuna.journal")))


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # -- validate everything before anything is written -----------------------------------
    setting = get_setting(args.setting)
    modes = mode_choices(args.mode)
    seeds = [f"{s}.seed={args.seed}" for s in ("classifier", "cvae", "stage2")]
    base = budget_config(args.budget, setting.family, seeds + list(args.overrides))
    space = default_space(base)
    if args.space:
        space = load_space_file(args.space, space)
    if args.num_samples < 1:
        fail("--num-samples must be at least 1")
    data_root = str(resolve_data_root(args.data_root))
    first_partition = min(setting.partitions)
    split = make_split(setting, first_partition, base.data, data_root, args.download,
                       args.ood_dataset)  # data present? (Setting 2: which OOD sets?)
    backbone = backbone_from_args(args, tuple(setting.partitions))
    if backbone is not None:  # strict load now: a bad file fails before Ray starts
        backbone.load(split.num_classes, split.family, base.classifier.head_width,
                      trained_for=(setting.name, first_partition, base.data))
    if split.skipped_ood_sets:
        print(f"warning: OOD sets not found, skipped: {', '.join(split.skipped_ood_sets)}; the "
              f"objective is the mean over {', '.join(n for n, _, _ in split.ood_sets)}",
              file=sys.stderr)
    storage = _resolve_storage(args.storage)
    name = args.name or f"{setting.name}-{args.mode}-{args.budget}"
    experiment = _join(storage, name)
    if "://" not in storage:
        exists = Path(experiment, "tuner.pkl").exists()
        if args.resume and not exists:
            fail(f"no sweep to resume in {experiment}; drop --resume or fix --name/--storage")
        if not args.resume and Path(experiment).exists():
            fail(f"experiment {experiment} exists; pass --resume to continue it or choose "
                 "another --name")
    started = time.time()

    from tune.driver import run_sweep  # imports Ray: only after the input is known to be good

    summary = run_sweep(args, setting, modes, base, space, data_root, storage, name,
                        first_point(space, base, setting.default_sigma, modes),
                        lambda: _study_storage(args.study_storage, experiment), split.ood_sets,
                        backbone)
    summary["wall_seconds"] = round(time.time() - started, 1)
    if "://" not in experiment:
        write_json(Path(experiment) / "summary.json", summary)
    print(format_summary(summary))
    if args.report and summary["trials"]["total"]:
        print(_write_report(experiment, args.study_storage))
    return summary


def _write_report(experiment: str, study_storage: str | None) -> str:
    """The analysis report beside the results (local storage); for a URI, the command to run."""
    if "://" in experiment:
        return f"report: python -m analysis.report {experiment} --study-storage URL"
    from analysis.report import write_report

    try:
        files = write_report(experiment, Path(experiment) / "report", study_storage)
    except Exception as err:  # the sweep's results are safe; the report can be made again later
        return f"report not written ({type(err).__name__}: {err}); python -m analysis.report {experiment}"
    return f"report: {files['report']}"


def _mean_sd(metrics: dict, name: str) -> str:
    """'mean +- sample sd over partitions' (no sd for one partition: null in summary.json)."""
    mean, sd = metrics[f"{name}_mean"], metrics[f"{name}_std"]
    return f"{mean:.4f} +- {sd:.4f}" if sd is not None else f"{mean:.4f}"


def format_summary(s: dict) -> str:
    lines = [f"sweep {s['name']}: {s['trials']['total']} trials "
             f"({s['trials']['complete']} complete, {s['trials']['stopped']} "
             f"stopped early, {s['trials']['errored']} errored) in {s.get('wall_seconds', 0):.0f} s"]
    best = s.get("best")
    if best:
        m = best["metrics"]
        lines.append(f"best configuration (trial {best['trial_id']}): {json.dumps(best['params'])}")
        for label, prefix in (("CMG", ""), *((v, f"{k}_") for k, v in BASELINES.items())):
            lines.append(f"  {label:<12} " + "   ".join(
                f"{part} AUROC {_mean_sd(m, f'{prefix}{part}_auroc')}" for part in ("val", "test")))
        if m.get("partitions_done") == 1:
            lines.append("  (one partition: no spread)")
    else:
        lines.append("no configuration finished all its partitions")
    lines += [f"stage-1 models: {s['stage1_trained']} trained, {s['stage1_reused']} reused",
              f"experiment: {s['experiment']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
