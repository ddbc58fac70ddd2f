"""Seed replicates (`python -m tune.replicate`) as tables: a configuration's test AUROC over
seeds x partitions, with its between-seed spread and a seed-level interval.

    df = load_replicates("experiments/NAME")   # one row per (replicate trial, partition)
    table = replicate_table(df)                # one row per (configuration, score)
    print(replicate_markdown(table))

Per configuration and score (CMG, each baseline of cmg.results.BASELINES, and CMG's lift over
each baseline, paired within (seed, partition)):
- `mean`: over every (seed, partition);
- `seed_sd`: the sample sd of the seed-level means (one mean over the partitions per seed);
- `seed_ci_low/high`: 95% t-interval over those seed-level means: the interval to quote, since
  seeds are independent draws and partitions that share IND classes are not;
- `partition_ci_low/high`: 95% t-interval over the partition-level means (each averaged over
  the seeds), as the sweep's one-seed reports compute it; none for one partition.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pyarrow import fs as pafs
from scipy import stats

from analysis.trials import NotAnExperiment, load_trials, open_experiment
from cmg.results import BASELINES, REPLICATE_DIR, REPLICATE_PREFIX



def load_replicates(experiment: str | Path) -> pd.DataFrame:
    """One row per (complete replicate trial, partition), with `source_trial` (the sweep trial
    whose configuration it re-runs), `seed` and `run` (the call of tune.replicate); for a
    (configuration, seed) run more than once, the latest complete trial. Empty when none."""
    filesystem, root = open_experiment(experiment)
    infos = filesystem.get_file_info(
        pafs.FileSelector(f"{root.rstrip('/')}/{REPLICATE_DIR}", allow_not_found=True))
    frames = []
    for run in sorted(i.path for i in infos if i.type == pafs.FileType.Directory):
        try:
            frames.append(load_trials(run, trainable=REPLICATE_PREFIX).assign(run=run))
        except NotAnExperiment:  # a call that was stopped before its first trial
            continue
    empty = pd.DataFrame(columns=["trial_id", "source_trial", "seed", "partition", "run"])
    if not frames:
        return empty
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"] == "complete"].rename(
        columns={"param_source_trial": "source_trial", "param_seed": "seed"})
    if df.empty:
        return empty
    df = df.sort_values(["run", "trial_number", "partition"])
    latest = df.drop_duplicates(["source_trial", "seed"], keep="last")[["run", "trial_id"]]
    df = df.merge(latest, on=["run", "trial_id"])
    df["seed"] = df["seed"].astype(int)
    return df.reset_index(drop=True)


def t_interval(values: pd.Series) -> tuple[float, float]:
    """95% t-interval of the mean of `values` (NaNs for fewer than two)."""
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / n ** 0.5
    return values.mean() - half, values.mean() + half


def _scores() -> dict[str, str]:
    """{label: column} of CMG, the baselines and the paired lifts, in table order."""
    scores = {"CMG": "test_auroc"}
    scores.update({label: f"{b}_test_auroc" for b, label in BASELINES.items()})
    scores.update({f"lift vs {label}": f"lift_{b}" for b, label in BASELINES.items()})
    return scores


def replicate_table(df: pd.DataFrame, only: list[str] | None = None,
                    seeds: list[int] | None = None) -> pd.DataFrame:
    """One row per (configuration, score); `only`/`seeds` restrict to those configurations and
    seeds (default: all replicated)."""
    if df.empty:
        return pd.DataFrame()
    df = df.copy()
    for b in BASELINES:  # paired within (seed, partition): same stage-1 models
        df[f"lift_{b}"] = df["test_auroc"] - df[f"{b}_test_auroc"]
    if only is not None:
        df = df[df["source_trial"].isin(only)]
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    rows = []
    order = only if only is not None else list(dict.fromkeys(df["source_trial"]))
    for source in order:
        group = df[df["source_trial"] == source]
        if group.empty:
            continue
        for label, column in _scores().items():
            values = group[column].astype(float)
            per_seed = values.groupby(group["seed"]).mean()
            per_partition = values.groupby(group["partition"]).mean()
            seed_low, seed_high = t_interval(per_seed)
            part_low, part_high = t_interval(per_partition)
            rows.append({"configuration": source, "score": label,
                         "seeds": len(per_seed), "partitions": len(per_partition),
                         "mean": values.mean(), "seed_sd": per_seed.std(ddof=1),
                         "seed_ci_low": seed_low, "seed_ci_high": seed_high,
                         "partition_ci_low": part_low, "partition_ci_high": part_high})
    return pd.DataFrame(rows)


def _span(low: float, high: float, sign: bool) -> str:
    if pd.isna(low):
        return "n/a"
    return f"[{low:+.4f}, {high:+.4f}]" if sign else f"[{low:.4f}, {high:.4f}]"


def replicate_markdown(table: pd.DataFrame) -> str:
    """One Markdown table per replicated configuration."""
    if table.empty:
        return "_No seed replicates yet: python -m tune.replicate EXPERIMENT --top 3 --seeds 3._"
    parts = []
    for source, group in table.groupby("configuration", sort=False):
        first = group.iloc[0]
        lines = [{
            "test AUROC": row.score,
            "mean (seeds x partitions)": f"{row.mean:+.4f}" if row.score.startswith("lift")
            else f"{row.mean:.4f}",
            "between-seed sd": "n/a" if pd.isna(row.seed_sd) else f"{row.seed_sd:.4f}",
            "95% CI over seeds": _span(row.seed_ci_low, row.seed_ci_high,
                                       row.score.startswith("lift")),
            "95% CI over partitions (not independent)": _span(
                row.partition_ci_low, row.partition_ci_high, row.score.startswith("lift")),
        } for row in group.itertuples(index=False)]
        parts += [f"Configuration of trial `{source}`: {first.seeds} seeds x {first.partitions} "
                  "partitions (lifts paired within seed and partition).", "",
                  pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(parts).rstrip()
