"""Sweep results as pandas tables: one row per (trial, partition), one row per configuration.

Reads only the files `tune.sweep` writes (no Ray, no torch)::

    df = load_trials("experiments/same_dataset_mnist-CMG-energy-demo")
    table = aggregate(df)                 # mean, std, 95% CI per metric; lift over baselines
    leaderboard(table)                    # complete configurations, best validation AUROC first
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from scipy import stats

from cmg.config import BASELINES, METRIC_NAMES

PARTITIONS = 5
# CMG's flat metric names and the baselines', as the sweep reports them (cmg.pipeline.flat_metrics)
CMG_METRICS = [f"{part}_{name}" for part in ("val", "test") for name in METRIC_NAMES]
ALL_METRICS = CMG_METRICS + [f"{b}_{m}" for b in BASELINES for m in CMG_METRICS]


class NotAnExperiment(ValueError):
    """The path holds no sweep results."""


def _rows(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_trials(experiment: str | Path) -> pd.DataFrame:
    """One row per (trial, partition) reported: trial_id, status, partition, the trial's
    parameters (prefixed `param_`) and every metric of CMG and of the baselines.

    status: "complete" (all five partitions), "error" (error.txt), else "stopped" (ASHA stopped
    it, or it is still running). A trial with no report yet gets one row with partition NaN."""
    experiment = Path(experiment)
    folders = sorted(p for p in experiment.glob("stage2_trainable_*") if p.is_dir())
    if not experiment.is_dir() or not folders:
        raise NotAnExperiment(f"{experiment} holds no sweep trials (stage2_trainable_* folders)")
    records = []
    for folder in folders:
        params_file = folder / "params.json"
        params = json.loads(params_file.read_text()) if params_file.exists() else {}
        rows = _rows(folder / "result.json")
        status = ("error" if (folder / "error.txt").exists()
                  else "complete" if len(rows) >= PARTITIONS else "stopped")
        trial_id = rows[0]["trial_id"] if rows else folder.name.split("_")[2]
        base = {"trial_id": trial_id, "status": status,
                **{f"param_{k}": v for k, v in params.items()}}
        for row in rows or [{}]:
            records.append({**base, "partition": row.get("partition"),
                            **{m: row.get(m) for m in ALL_METRICS}})
    return pd.DataFrame.from_records(records)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: for every metric its mean, sample standard deviation and 95% t-interval
    (`_ci_low`, `_ci_high`) over the partitions done, `n_partitions`, the status and parameters,
    and the paired lift of CMG over each baseline (`lift_msp_val_auroc`: mean over partitions of
    CMG minus max-softmax, with its own interval)."""
    done = df.dropna(subset=["partition"]).copy()
    for b in BASELINES:
        for part in ("val", "test"):
            done[f"lift_{b}_{part}_auroc"] = done[f"{part}_auroc"] - done[f"{b}_{part}_auroc"]
    lifts = [c for c in done.columns if c.startswith("lift_")]
    params = [c for c in df.columns if c.startswith("param_")]
    out = []
    for trial_id, group in done.groupby("trial_id", sort=False):
        n = len(group)
        row = {"trial_id": trial_id, "status": group["status"].iloc[0], "n_partitions": n,
               **group[params].iloc[0].to_dict()}
        t = stats.t.ppf(0.975, n - 1) if n > 1 else float("nan")
        for metric in ALL_METRICS + lifts:
            values = group[metric].astype(float)
            mean, std = values.mean(), values.std(ddof=1)
            half = t * std / n ** 0.5
            row.update({f"{metric}_mean": mean, f"{metric}_std": std,
                        f"{metric}_ci_low": mean - half, f"{metric}_ci_high": mean + half})
        out.append(row)
    return pd.DataFrame(out)


def leaderboard(table: pd.DataFrame, by: str = "val_auroc") -> pd.DataFrame:
    """Configurations with all five partitions only, best `by` (a validation metric) first, with
    the test AUROC and both baselines' beside it."""
    complete = table[table["n_partitions"] == PARTITIONS]
    ascending = by.endswith("fpr95")  # lower is better
    columns = ["trial_id", f"{by}_mean", f"{by}_std", "test_auroc_mean", "test_auroc_std",
               "msp_test_auroc_mean", "energy_test_auroc_mean", "lift_msp_test_auroc_mean",
               "lift_energy_test_auroc_mean"]
    params = [c for c in table.columns if c.startswith("param_")]
    ranked = complete.sort_values(f"{by}_mean", ascending=ascending)
    return ranked[list(dict.fromkeys(columns + params))].reset_index(drop=True)
