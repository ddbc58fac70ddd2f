"""Sweep results as pandas tables: one row per (trial, partition), one row per configuration.

Reads only the files `tune.sweep` writes (no Ray, no torch), from a local folder or a pyarrow
filesystem URI (`s3://bucket/sweeps/NAME`, `file:///...`), while the sweep runs or after::

    df = load_trials("experiments/same_dataset_mnist-CMG-energy-demo")
    table = aggregate(df)                 # mean, std, 95% CI per metric; lift over baselines
    leaderboard(table)                    # complete configurations, best validation AUROC first
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from pyarrow import fs as pafs
from scipy import stats

from cmg.results import (ALL_METRICS, BASELINES, OOD_SET_METRIC, ROWS_FILE, TRIAL_PREFIX,
                         open_storage, partition_mean_std, trial_number)

PARTITIONS = 5  # Setting 1; a sweep's reports say how many they have (`partitions_total`)
# trials read at once: each is 3 small requests, which on S3 wait far longer than they compute
READERS = 32


class NotAnExperiment(ValueError):
    """The path holds no sweep results."""


def open_experiment(experiment: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local folder or a pyarrow filesystem URI."""
    try:
        return open_storage(str(experiment))
    except Exception as err:  # pyarrow raises several types for unusable URIs
        raise NotAnExperiment(f"cannot open {experiment}: {err}") from None


def _read_text(filesystem: pafs.FileSystem, path: str) -> str | None:
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    except (FileNotFoundError, OSError):
        return None


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


def trial_rows(folder: str | Path, filesystem: pafs.FileSystem | None = None) -> list[dict]:
    """A trial's full rows, one per partition done (a partition reported twice, by a retried
    trial: its last row), from its folder (a local path, a URI, or a path on `filesystem`). The
    rows are in the trial's ROWS_FILE; an experiment written before it existed has them in
    Tune's result.json, which fills in any partition ROWS_FILE lacks."""
    if filesystem is None:
        filesystem, folder = open_experiment(folder)
    rows = {r.get("partition"): r
            for name in ("result.json", ROWS_FILE)  # later files win
            for r in json_lines(_read_text(filesystem, f"{folder}/{name}") or "")}
    return list(rows.values())


def load_trials(experiment: str | Path, trainable: str = TRIAL_PREFIX) -> pd.DataFrame:
    """One row per (trial, partition) reported: trial_id, trial_number (Tune's order of
    creation), status, partitions_total (5, or 1 for different_dataset), partition, the trial's
    parameters (prefixed `param_`) and every metric of CMG and of the baselines (`trial_rows`).

    status: "complete" (all five partitions), "error" (the trial failed: error.txt), else
    "incomplete" (ASHA stopped it early, or it is still running). A trial with no report yet gets
    one row with partition NaN. A partition reported twice (a retried trial) is one row, its
    last report; a report still being written is left out. `trainable`: whose trial folders
    to read (tune.replicate's are in EXPERIMENT/replicate). Trials are read READERS at a time
    (thousands of trials on S3 are thousands of requests)."""
    filesystem, root = open_experiment(experiment)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as err:
        raise NotAnExperiment(f"cannot list {experiment}: {err}") from None
    folders = sorted((i for i in infos if i.type == pafs.FileType.Directory
                      and i.base_name.startswith(f"{trainable}_")),
                     key=lambda i: (trial_number(i.base_name, trainable), i.base_name))
    if not folders:
        raise NotAnExperiment(f"{experiment} holds no sweep trials ({trainable}_* folders); "
                              "pass the folder that tune.sweep wrote (STORAGE/NAME)")
    with ThreadPoolExecutor(max_workers=READERS) as pool:  # map keeps the folders' order
        per_trial = pool.map(lambda f: _trial_records(filesystem, f, trainable), folders)
        return pd.DataFrame.from_records([r for records in per_trial for r in records])


def _trial_records(filesystem: pafs.FileSystem, folder: pafs.FileInfo,
                   trainable: str) -> list[dict]:
    """`load_trials`' rows of one trial folder."""
    params = json.loads(_read_text(filesystem, f"{folder.path}/params.json") or "{}")
    rows = trial_rows(folder.path, filesystem)
    failed = _read_text(filesystem, f"{folder.path}/error.txt") is not None
    total = max((r.get("partitions_total", PARTITIONS) for r in rows), default=PARTITIONS)
    status = ("error" if failed else "complete" if len(rows) >= total else "incomplete")
    trial_id = rows[0]["trial_id"] if rows else folder.base_name.split("_")[2]
    base = {"trial_id": trial_id, "trial_number": trial_number(folder.base_name, trainable),
            "status": status, "partitions_total": total,
            **{f"param_{k}": v for k, v in params.items()}}
    return [{**base, "partition": row.get("partition"), **{m: row.get(m) for m in ALL_METRICS},
             **{k: v for k, v in row.items() if OOD_SET_METRIC.match(k)}}
            for row in rows or [{}]]


def ood_sets(df: pd.DataFrame) -> list[str]:
    """The OOD sets that have their own metric columns (different_dataset), in report order."""
    names = (OOD_SET_METRIC.match(c) for c in df.columns)
    return list(dict.fromkeys(m["set"] for m in names if m))


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: for every metric (per OOD set too) its mean, sample standard deviation
    and 95% t-interval (`_ci_low`, `_ci_high`) over the partitions done, `n_partitions`, the
    status and parameters, and the paired lift of CMG over each baseline (`lift_msp_val_auroc`:
    mean over partitions of CMG minus max-softmax, with its own interval)."""
    done = df.dropna(subset=["partition"]).copy()
    for b in BASELINES:
        for part in ("val", "test"):
            done[f"lift_{b}_{part}_auroc"] = done[f"{part}_auroc"] - done[f"{b}_{part}_auroc"]
    lifts = [c for c in done.columns if c.startswith("lift_")]
    per_set = [c for c in done.columns if OOD_SET_METRIC.match(c)]
    params = [c for c in df.columns if c.startswith("param_")]
    out = []
    for trial_id, group in done.groupby("trial_id", sort=False):
        n = len(group)
        row = {"trial_id": trial_id, "trial_number": group["trial_number"].iloc[0],
               "status": group["status"].iloc[0], "n_partitions": n,
               "partitions_total": group["partitions_total"].iloc[0],
               **group[params].iloc[0].to_dict()}
        t = stats.t.ppf(0.975, n - 1) if n > 1 else float("nan")
        for metric in ALL_METRICS + per_set + lifts:
            mean, std = partition_mean_std(group[metric].astype(float))
            half = t * std / n ** 0.5
            row.update({f"{metric}_mean": mean, f"{metric}_std": std,
                        f"{metric}_ci_low": mean - half, f"{metric}_ci_high": mean + half})
        out.append(row)
    return pd.DataFrame(out)


def leave_one_set_out(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """different_dataset: how much of the selection survives an OOD set never seen. For each OOD
    set, the complete configuration with the best mean validation AUROC over the *other* sets,
    and its test AUROC on the held-out set, beside the configuration chosen on all sets (the
    leaderboard's first) and the baselines of the held-out choice. Needs two or more sets."""
    complete = table[is_complete(table)]
    if len(names) < 2 or complete.empty:
        return pd.DataFrame()
    chosen_all = complete.loc[complete["val_auroc_mean"].idxmax()]
    rows = []
    for held_out in names:
        others = complete[[f"val_{n}_auroc_mean" for n in names if n != held_out]].mean(axis=1)
        chosen = complete.loc[others.idxmax()]
        rows.append({
            "held-out OOD set": held_out, "chosen without it": chosen["trial_id"],
            "test AUROC (chosen without it)": chosen[f"test_{held_out}_auroc_mean"],
            "chosen on all sets": chosen_all["trial_id"],
            "test AUROC (chosen on all sets)": chosen_all[f"test_{held_out}_auroc_mean"],
            **{label: chosen[f"{b}_test_{held_out}_auroc_mean"] for b, label in BASELINES.items()},
        })
    return pd.DataFrame(rows)


def is_complete(table: pd.DataFrame) -> pd.Series:
    """Rows of `aggregate`'s table that cover every partition of their setting."""
    return table["n_partitions"] == table["partitions_total"]


def check_selection_metric(by: str, allow_test: bool) -> None:
    """Configurations are chosen on validation metrics; ranking on a test metric must be asked
    for (`allow_test=True`), never happen by a typo."""
    if not by.startswith("val_") and not allow_test:
        raise ValueError(f"by={by!r}: rank on a validation metric (val_auroc, val_fpr95, ...); "
                         "pass allow_test=True to rank on test data on purpose")


def leaderboard(table: pd.DataFrame, by: str = "val_auroc",
                allow_test: bool = False) -> pd.DataFrame:
    """Complete configurations only (every partition of the setting), best `by` (a validation
    metric; a test metric only with allow_test=True) first, with the test AUROC and the
    baselines' beside it."""
    check_selection_metric(by, allow_test)
    complete = table[is_complete(table)]
    ascending = by.endswith("fpr95")  # lower is better
    columns = ["trial_id", f"{by}_mean", f"{by}_std", "test_auroc_mean", "test_auroc_std",
               *(f"{b}_test_auroc_mean" for b in BASELINES),
               *(f"lift_{b}_test_auroc_mean" for b in BASELINES)]
    params = [c for c in table.columns if c.startswith("param_")]
    ranked = complete.sort_values(f"{by}_mean", ascending=ascending)
    return ranked[list(dict.fromkeys(columns + params))].reset_index(drop=True)
