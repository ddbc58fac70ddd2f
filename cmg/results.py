"""The contract between a sweep and its readers: metric names, the flat keys results carry, the
experiment's file layout and how to open it. Standard library only (pyarrow is imported when a
storage is opened), so `analysis` reads results without torch or Ray.

    EXPERIMENT/                                   (a folder, or a pyarrow URI: s3://..., gs://...)
        manifest.json  summary.json  optuna.journal  sweep-context.pkl  report/
        stage2_trainable_<trial id>_<number>_<params>_<date>/     (one per configuration)
            result.json, params.json                             (Tune's: TUNE_KEYS only)
            partitions.jsonl                                     every partition's full row
            trial.json                                           the trial's resolved config
            scores/partition-N.parquet                           every evaluated image's scores
            checkpoint_XXXXXX/partitions.json, head-partition-N.pt
        replicate/run-<time>/replicate_trainable_.../            (tune.replicate)

    fs, root = open_storage("s3://bucket/sweeps/NAME")
    folders = [i for i in fs.get_file_info(...) if i.base_name.startswith(TRIAL_PREFIX + "_")]
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Iterable

METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95", "ind_acc")
# The baseline scores every result carries beside CMG's (their functions: cmg.metrics.SCORES),
# key -> the label tables and figures print. Iterate over this to cover every baseline.
BASELINES = {"msp": "max-softmax", "energy": "energy", "maxlogit": "max-logit"}
# The same scores of the selected *stage-2* head (`head_msp_test_auroc`, ...): what re-training the
# head did to each baseline, beside what CMG's own score does (a control, not a baseline).
HEAD_BASELINES = {f"head_{b}": f"{label}, stage-2 head" for b, label in BASELINES.items()}
# The control arms (cmg.config.Stage2Config.pseudo_ood): what stage 2 trains the head against.
# "mixed" is CMG; the others change only that, on the same stage-1 models, seeds and partitions.
ARMS = {"mixed": "CMG (class-mixed pseudo-OOD)",
        "single": "pseudo-OOD without class mixing (one class per condition)",
        "noise": "uniform-noise images as pseudo-OOD",
        "none": "head re-training only (no pseudo-OOD)"}
# Flat keys, as each partition's report carries them (cmg.pipeline.flat_metrics): CMG's
# `val_auroc`, a baseline's `msp_test_fpr95`; Setting 2 adds each OOD set's own
# (`test_SVHN_auroc`, `msp_val_LSUN_fpr95`); a running aggregate over partitions adds `_mean`
# and `_std` to every key.
CMG_METRICS = [f"{part}_{name}" for part in ("val", "test") for name in METRIC_NAMES]
ALL_METRICS = CMG_METRICS + [f"{b}_{m}" for b in (*BASELINES, *HEAD_BASELINES)
                              for m in CMG_METRICS]
OOD_SET_METRIC = re.compile(rf"^(?:(?:{'|'.join([*HEAD_BASELINES, *BASELINES])})_)?"
                            r"(?:val|test)_(?P<set>.+?)_"
                            r"(?P<metric>auroc|aupr_in|aupr_out|fpr95)$")
OBJECTIVE = "val_auroc_mean"  # what the sweep maximises: mean validation AUROC over partitions
# What a trial reports to Ray Tune after each partition: the objective and what the searcher,
# the scheduler, the progress lines, the summary and a logger's dashboard read. The partition's
# full row (every metric of CMG and the baselines, their running means and sds, timings) goes to
# the trial's ROWS_FILE only: Tune keeps running statistics of every reported key of every trial
# in the driver and in each experiment snapshot, so ~135 keys per trial made that state grow
# ~160 KB per trial (bench/README.md, "Thousands of trials").
TUNE_KEYS = (OBJECTIVE, "val_auroc_std", "test_auroc_mean", "test_auroc_std", "val_auroc",
             "test_auroc", "partition", "partitions_done", "partitions_total", "stage1_key",
             "stage1_trained", "node_id", "restored_partitions")

# The experiment's files
TRIAL_PREFIX = "stage2_trainable"  # Tune names a trial folder after its function (tune.trainables)
REPLICATE_PREFIX = "replicate_trainable"
REPLICATE_DIR = "replicate"  # EXPERIMENT/replicate/run-<time>/: one Tune run per tune.replicate
REPLICATES_FILE = "replicates.csv"  # in a report: one row per (replicate trial, partition)
MANIFEST = "manifest.json"  # how the sweep was launched (tune.manifest)
SUMMARY = "summary.json"  # the sweep's end: counts, best configuration, baselines
STUDY_JOURNAL = "optuna.journal"  # the study, when the sweep had no --study-storage
CONTEXT_FILE = "sweep-context.pkl"  # what tune.replicate re-runs a configuration with
TRIAL_FILE = "trial.json"
# A trial's full rows, one JSON line per partition done (rewritten whole after each partition);
# experiments written before it have them in Tune's result.json instead
ROWS_FILE = "partitions.jsonl"


def scores_file(partition: int) -> str:
    """Where a trial's per-image scores of a partition lie, inside its folder."""
    return f"scores/partition-{partition}.parquet"


def head_file(partition: int) -> str:
    """A partition's selected stage-2 head (a state dict) inside a trial's checkpoint."""
    return f"head-partition-{partition}.pt"


def trial_number(folder_name: str, prefix: str = TRIAL_PREFIX) -> int:
    """Tune's order of creation, from a folder named `<prefix>_<id>_<number>_<params>_<date>`
    (-1 for another name)."""
    match = re.match(rf"{prefix}_[0-9a-f]+_(\d+)_", folder_name)
    return int(match.group(1)) if match else -1


def partition_mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over partitions, missing (NaN) values left out; the sd
    is NaN for one partition. Every `_mean`/`_std` key holds these, in the sweep's live reports
    and in analysis alike."""
    present = [float(v) for v in values if not math.isnan(float(v))]
    if not present:
        return math.nan, math.nan
    return (statistics.fmean(present),
            statistics.stdev(present) if len(present) > 1 else math.nan)


def is_uri(location: str) -> bool:
    """A pyarrow filesystem URI (s3://, gs://, file://...) rather than a local path."""
    return "://" in str(location)


def open_storage(location: str):
    """(pyarrow filesystem, path inside it) of a local folder (absolute, `~` expanded) or a URI.
    Raises pyarrow's errors for an unusable URI."""
    from pathlib import Path

    from pyarrow import fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
