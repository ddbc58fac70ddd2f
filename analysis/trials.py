"""Sweep results as pandas tables: one row per (trial, partition), one row per configuration.

Reads only the files `tune.sweep` writes (no Ray, no torch), from a local folder or a pyarrow
filesystem URI (`s3://bucket/sweeps/NAME`, `file:///...`), while the sweep runs or after::

    df = load_trials("experiments/same_dataset_mnist-CMG-energy-demo")
    table = aggregate(df)                 # mean, std, 95% CI per metric; lift over baselines
    leaderboard(table)                    # complete configurations, best validation AUROC first
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy import stats

from cmg.results import (ALL_METRICS, BASELINES, OOD_SET_METRIC, ROW_INFO, TRIAL_KIND, Experiment,
                         NotAnExperiment, TrialFolder, json_lines, partition_mean_std, trial_rows)

__all__ = ["NotAnExperiment", "aggregate", "is_complete", "json_lines", "leaderboard",
           "load_trials", "trial_rows"]

def load_trials(experiment: str | Path | Experiment, kind: str = TRIAL_KIND,
                partitions: int | None = None) -> pd.DataFrame:
    """One row per (trial, partition) reported: trial_id, trial_number (Tune's order of
    creation), status, partitions_total (from the reports, else the manifest, else
    `partitions`), partition, the trial's parameters (prefixed `param_`), every metric of CMG
    and of the baselines, and what else each partition recorded (cmg.results.ROW_INFO: the
    selected epoch, seconds per stage, the stage-1 key, the node).

    status: "complete" (every partition), "error" (the trial failed: error.txt), else
    "incomplete" (ASHA stopped it early, or it is still running). A trial with no report yet gets
    one row with partition NaN. A partition reported twice (a retried trial) is one row, its
    last report; a report still being written is left out. `kind`: whose trial folders to read
    (tune.replicate's, REPLICATE_KIND, are in EXPERIMENT/replicate/run-*). Trials are read
    several at a time (`Experiment.each`: thousands of trials on S3 are thousands of requests)."""
    exp = experiment if isinstance(experiment, Experiment) else Experiment.open(experiment)
    folders = exp.trials(kind)
    if not folders:
        raise NotAnExperiment(f"{exp.location} holds no sweep trials ({kind}-* folders); pass "
                              "the folder that tune.sweep wrote (STORAGE/NAME)")
    partitions = exp.partitions() or partitions
    per_trial = exp.each(lambda f: _trial_records(exp, f, partitions), folders)
    return pd.DataFrame.from_records([r for records in per_trial for r in records])


def _trial_records(exp: Experiment, folder: TrialFolder, partitions: int | None) -> list[dict]:
    """`load_trials`' rows of one trial folder."""
    rows = exp.rows(folder)
    total = max((r["partitions_total"] for r in rows if "partitions_total" in r),
                default=partitions)
    status = ("error" if exp.failed(folder)
              else "complete" if total is not None and len(rows) >= total else "incomplete")
    base = {"trial_id": folder.trial_id, "trial_number": folder.number, "status": status,
            "partitions_total": total,
            **{f"param_{k}": v for k, v in exp.params(folder).items()}}
    return [{**base, "partition": row.get("partition"), **{m: row.get(m) for m in ALL_METRICS},
             **{k: v for k, v in row.items() if OOD_SET_METRIC.match(k)},
             **{k: row[k] for k in ROW_INFO if k in row}}
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
