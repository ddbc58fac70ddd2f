"""The contract between a sweep and its readers: metric names, the flat keys results carry, the
experiment's file layout and the one way to open it (`Experiment`). Standard library only
(pyarrow is imported when a storage is opened), so `analysis` reads results without torch or Ray,
and `tune` reads its own experiments (replicate, export, resume) through the same reader.

    EXPERIMENT/                                   (a folder, or a pyarrow URI: s3://..., gs://...)
        manifest.json  summary.json  optuna.journal  report/
        trial-<number>-<trial id>/                               (one per configuration)
            result.json, params.json                             (Tune's: TUNE_KEYS only)
            partitions.jsonl                                     every partition's full row
            trial.json                                           the trial's resolved config
            scores/partition-N.parquet                           every evaluated image's scores
            heads/partition-N.pt                                 the selected stage-2 head
            checkpoint_XXXXXX/partitions.json                    the partitions done
        replicate/run-<time>/replicate-<number>-<trial id>/      (tune.replicate)
        arm-<arm>/                   (tune.sweep --arms: a control arm's study, laid out alike)

    exp = Experiment.open("s3://bucket/sweeps/NAME")     # NotAnExperiment if it cannot be read
    exp.manifest["partitions"]                            # the sweep's spec (tune.spec.SweepSpec)
    for folder in exp.trials():                           # in Tune's order of creation
        rows = exp.rows(folder)                           # its full rows, one per partition

Experiments written before trial folders were named `trial-...` have Tune's default names
(`stage2_trainable_<id>_<number>_<params>_<date>`, `replicate_trainable_...`): read alike.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

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
# An arm run with overrides of the sweep's config (tune.replicate --variant), a variant beside its
# plain runs: "none + stage2.label_smoothing=0" (head re-training without stage 1's smoothing)
VARIANT_SEP = " + "


def variant_arm(arm: str, variant: str | None) -> str:
    """The arm's name in the records: `arm`, or "ARM + VARIANT" for a run with overrides
    (`variant`: its KEY=VALUE overrides joined by ";"; None or "": the plain arm)."""
    return f"{arm}{VARIANT_SEP}{variant}" if variant else arm


def split_arm(name: str) -> tuple[str, str]:
    """(the arm, its variant or ""): `variant_arm` undone."""
    arm, _, variant = name.partition(VARIANT_SEP)
    return arm, variant


def variant_suffix(variant: str) -> str:
    """What a label adds for a variant's overrides (", with KEY=VALUE, ..."; "" for none)."""
    return f", with {variant.replace(';', ', ')}" if variant else ""


def arm_label(name: str) -> str:
    """The label tables print for an arm or a variant of one: ARMS's, then the overrides."""
    arm, variant = split_arm(name)
    return ARMS[arm] + variant_suffix(variant)


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
# What else a partition's row records beside metrics (tune.trainables), kept by every reader:
# trials.parquet has these columns
# (`stage1_weights`: which bits the stage-1 models of `stage1_key` had, tune.artifacts)
ROW_INFO = ("selected_epoch", "stage1_s", "stage1_train_s", "stage2_s", "scores_s",
            "stage1_key", "stage1_weights", "stage1_trained", "node_id", "restored_partitions")

# The experiment's files
TRIAL_KIND = "trial"  # a sweep's trial folders: trial-<number>-<id>
REPLICATE_KIND = "replicate"  # tune.replicate's: replicate-<number>-<id>
# the names Tune gave trial folders before (its trainable's name first): still read
OLD_PREFIXES = {TRIAL_KIND: "stage2_trainable", REPLICATE_KIND: "replicate_trainable"}
# tune.sweep --arms: each control arm's study is EXPERIMENT/arm-<arm> (the layout above, its
# manifest.json written from the sweep's, its study NAME/arm-<arm>); CMG's is EXPERIMENT itself
ARM_PREFIX = "arm-"
REPLICATE_DIR = "replicate"  # EXPERIMENT/replicate/run-<time>/: one Tune run per tune.replicate
REPLICATES_FILE = "replicates.csv"  # in a report: one row per (replicate trial, partition)
MANIFEST = "manifest.json"  # the sweep's spec and provenance (tune.manifest)
MANIFEST_FORMAT = 2  # 2: the whole SweepSpec; 1 (no "format" key): options, space, run config
SUMMARY = "summary.json"  # the sweep's end: counts, best configuration, baselines
STUDY_JOURNAL = "optuna.journal"  # the study, when the sweep had no --study-storage
TRIAL_FILE = "trial.json"
# A trial's full rows, one JSON line per partition done (rewritten whole after each partition);
# experiments written before it have them in Tune's result.json instead
ROWS_FILE = "partitions.jsonl"
# trial folders an experiment reader reads at once (Experiment.each)
READERS = 32


def scores_file(partition: int) -> str:
    """Where a trial's per-image scores of a partition lie, inside its folder."""
    return f"scores/partition-{partition}.parquet"


def head_file(partition: int) -> str:
    """A partition's selected stage-2 head (a state dict), inside its trial's folder."""
    return f"heads/partition-{partition}.pt"


def checkpoint_head_file(partition: int) -> str:
    """Where experiments written before `head_file` kept a head: inside each checkpoint (every
    report then persisted every head the trial had, up to 5 MB, while the trial waited)."""
    return f"head-partition-{partition}.pt"


def trial_dirname(kind: str, number: int, trial_id: str) -> str:
    """A trial folder's name: `trial-3-2420ff69` (kind, Tune's order of creation, trial id)."""
    return f"{kind}-{number}-{trial_id}"


def parse_trial_dirname(name: str, kind: str = TRIAL_KIND) -> tuple[str, int] | None:
    """(trial id, Tune's order of creation) of a trial folder of `kind` (its name now, or Tune's
    `<trainable>_<id>_<number>_<params>_<date>` of older experiments); None for another name."""
    if match := re.fullmatch(rf"{kind}-(\d+)-([0-9a-zA-Z_]+)", name):
        return match.group(2), int(match.group(1))
    # Tune's trial ids: 8 hex digits, or 5 and a 5-digit counter (a variant generator's)
    if match := re.match(rf"{OLD_PREFIXES[kind]}_([0-9a-f]{{5}}_\d{{5}}|[0-9a-f]+)_(\d+)_", name):
        return match.group(1), int(match.group(2))
    return None


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


class NotAnExperiment(ValueError):
    """The path holds no sweep results (or none this version reads): a one-line message."""


def json_lines(text: str) -> list[dict]:
    """The records of a JSON-lines text (Tune's result.json, read while Tune appends to it): a
    last line without its newline that does not parse is still being written, and is left out
    (no prefix of a JSON object but the whole object parses). A line that ends with its newline
    and does not parse is a broken file: json.JSONDecodeError."""
    *complete, last = text.split("\n")  # `last` is "" when the text ends with its newline
    records = [json.loads(line) for line in complete if line.strip()]
    try:
        records += [json.loads(last)] if last.strip() else []
    except json.JSONDecodeError:
        pass  # half-written
    return records


@dataclass(frozen=True)
class TrialFolder:
    """One trial's folder in an experiment: its path on the experiment's filesystem, its name,
    trial id and Tune's order of creation."""

    path: str
    name: str
    trial_id: str
    number: int


class Experiment:
    """A sweep's experiment folder (local, `~` expanded, or a pyarrow URI), read-only; every
    reader (analysis, tune.replicate, tune.export, --resume) opens one this way. Files are read
    when asked for; a missing one is None (`read_text`, `read_json`) or a NotAnExperiment
    naming it (`read_bytes`)."""

    def __init__(self, location: str, filesystem, root: str):
        self.location, self.filesystem, self.root = str(location), filesystem, root.rstrip("/")

    @classmethod
    def open(cls, location: Any) -> "Experiment":
        """The experiment at LOCATION; NotAnExperiment if the storage cannot be opened."""
        try:
            return cls(str(location), *open_storage(str(location)))
        except Exception as err:  # pyarrow raises several types for unusable URIs
            raise NotAnExperiment(f"cannot open {location}: {err}") from None

    @property
    def name(self) -> str:
        """The experiment's (and its study's) name: its folder's."""
        return self.root.rsplit("/", 1)[-1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_bytes(self, *parts: str) -> bytes:
        data = self._read(self.path(*parts))
        if data is None:
            raise NotAnExperiment(f"{self.path(*parts)} is missing; was it written by "
                                  "tune.sweep?")
        return data

    def read_text(self, *parts: str) -> str | None:
        data = self._read(self.path(*parts))
        return None if data is None else data.decode()

    def read_json(self, *parts: str) -> Any:
        text = self.read_text(*parts)
        return None if text is None else json.loads(text)

    @functools.cached_property
    def manifest(self) -> dict[str, Any] | None:
        """manifest.json (tune.manifest: the sweep's spec and provenance); None without one."""
        return self.read_json(MANIFEST)

    def partitions(self) -> int | None:
        """How many partitions each configuration runs, from the manifest (None without one)."""
        return len(self.manifest["partitions"]) if self.manifest else None

    def folders(self, *parts: str) -> list[str]:
        """The paths of the sub-folders of the experiment (or of its folder PARTS), sorted;
        empty if it does not exist."""
        return self._list(parts, directories=True)

    def files(self, *parts: str) -> list[str]:
        """The paths of the files in a sub-folder (empty if it does not exist), sorted."""
        return self._list(parts, directories=False)

    def each(self, read: Callable[[TrialFolder], T], folders: list[TrialFolder]) -> list[T]:
        """`read(folder)` of every folder, in order, READERS at a time: each trial is a few small
        requests, which on S3 wait far longer than they compute."""
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            return list(pool.map(read, folders))

    def trials(self, kind: str = TRIAL_KIND) -> list[TrialFolder]:
        """The trial folders of `kind` (TRIAL_KIND, or REPLICATE_KIND in a replicate run), in
        Tune's order of creation."""
        found = []
        for path in self.folders():
            name = path.rsplit("/", 1)[-1]
            if parsed := parse_trial_dirname(name, kind):
                found.append(TrialFolder(path, name, *parsed))
        return sorted(found, key=lambda f: (f.number, f.name))

    def trial(self, trial_id: str, kind: str = TRIAL_KIND) -> TrialFolder:
        """The folder of trial `trial_id`; NotAnExperiment naming where the ids are."""
        found = [f for f in self.trials(kind) if f.trial_id == trial_id]
        if len(found) != 1:
            raise NotAnExperiment(f"no trial {trial_id} in {self.location}; the trial ids are "
                                  "in report/summary.csv")
        return found[0]

    def replicate_runs(self) -> list["Experiment"]:
        """tune.replicate's runs (EXPERIMENT/replicate/run-<time>), oldest first."""
        runs = Experiment(self.path(REPLICATE_DIR), self.filesystem, self.path(REPLICATE_DIR))
        return [Experiment(path, self.filesystem, path) for path in runs.folders()]

    def rows(self, folder: TrialFolder | str) -> list[dict]:
        """A trial's full rows, one per partition done (a partition reported twice, by a retried
        trial: its last row). They are in the trial's ROWS_FILE; an experiment written before it
        existed has them in Tune's result.json, which fills in any partition ROWS_FILE lacks."""
        path = folder.path if isinstance(folder, TrialFolder) else folder
        rows = {r.get("partition"): r
                for name in ("result.json", ROWS_FILE)  # later files win
                for r in json_lines(self._text(f"{path}/{name}") or "")}
        return list(rows.values())

    def complete_rows(self, folder: TrialFolder) -> list | None:
        """The trial's rows if it finished every partition (as many as its rows say, else the
        manifest) and did not fail, else None."""
        rows = self.rows(folder)
        total = (max((r["partitions_total"] for r in rows if "partitions_total" in r),
                     default=None) or self.partitions())
        return rows if total and len(rows) >= total and not self.failed(folder) else None

    def ranked(self) -> list[TrialFolder]:
        """The complete trials, best mean validation AUROC over the partitions first: the
        selection (never a test metric), as analysis.trials.leaderboard ranks them."""
        trials = self.trials()
        scored = [(partition_mean_std(r["val_auroc"] for r in rows)[0], folder)
                  for folder, rows in zip(trials, self.each(self.complete_rows, trials))
                  if rows is not None]
        return [folder for _, folder in sorted(scored, key=lambda pair: -pair[0])]

    def params(self, folder: TrialFolder) -> dict[str, Any]:
        """The trial's parameters exactly as Tune gave them (params.json; {} before it exists)."""
        return json.loads(self._text(f"{folder.path}/params.json") or "{}")

    def failed(self, folder: TrialFolder) -> bool:
        """Tune gave up on the trial (error.txt)."""
        return self._text(f"{folder.path}/error.txt") is not None

    def record(self, folder: TrialFolder) -> dict[str, Any]:
        """The trial's TRIAL_FILE: setting, family, budget, device, resolved config, data."""
        text = self._text(f"{folder.path}/{TRIAL_FILE}")
        if text is None:
            raise NotAnExperiment(f"{folder.path}/{TRIAL_FILE} is missing; was it written by "
                                  "tune.sweep?")
        return json.loads(text)

    def _text(self, path: str) -> str | None:
        data = self._read(path)
        return None if data is None else data.decode()

    def _read(self, path: str) -> bytes | None:
        """The file at PATH on the experiment's filesystem; None if it cannot be read."""
        try:
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def _list(self, parts: tuple[str, ...], directories: bool) -> list[str]:
        from pyarrow import fs as pafs

        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path(*parts),
                                                                    allow_not_found=True))
        except OSError as err:
            raise NotAnExperiment(f"cannot list {self.location}: {err}") from None
        kind = pafs.FileType.Directory if directories else pafs.FileType.File
        return sorted(i.path for i in infos if i.type == kind)


def trial_rows(folder: Any) -> list[dict]:
    """The full rows of the trial in FOLDER (a local path or a URI): `Experiment.rows`."""
    trial = Experiment.open(folder)
    return trial.rows(trial.root)
