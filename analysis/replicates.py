"""Seed replicates (`python -m tune.replicate`) as tables: a configuration's test AUROC over
independent (seed, partition) cells, beside its baselines and control arms, and the lifts that
answer "does class mixing add anything?" with Holm-adjusted p-values.

    df = load_replicates("experiments/NAME")   # one row per (replicate trial, partition)
    table = replicate_table(df)                # one row per (configuration, score)
    print(replicate_markdown(table))

Per configuration, the scores: CMG (arm "mixed"; beside it, apart, CMG on the sweep's own seed,
the run the configuration was selected on); each baseline of its stage-1 classifiers
(cmg.results.BASELINES); each control arm's own score (cmg.results.ARMS: the same configuration
trained against single-class pseudo-OOD, noise, or nothing) and, for head re-training alone,
the baselines of its re-trained head (`head_*`). Then CMG's lift over each of them, paired
within (seed, partition): the same stage-1 models. Columns:
- `mean`: over every (seed, partition) cell;
- `seed_sd`: the sample sd of the seed-level means (one mean over the partitions per seed);
- `seed_ci_low/high`: 95% t-interval over those seed-level means;
- for lifts, `p`: two-sided one-sample t-test of the seed-level mean lifts against 0, and
  `p_holm`: Holm's step-down adjustment over the configuration's lifts (the family, fixed in
  advance: every score in the table but a variant's, tune.replicate --variant, whose lift is
  descriptive: no `p_holm`, no verdict); `p_exact`: the exact sign-flip p of the same means (no
  normality assumed); `upper`: the 90% t-interval's upper end, the largest lift the data leave
  open; `verdict` reads `p_holm` at 0.05, and a "does not" carries `upper`.
Seeds are the independent units: a seed's cells share nothing, but the partitions share IND
classes, so no interval over partitions is given.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.trials import NotAnExperiment, load_trials
from cmg.results import (ARMS, BASELINES, HEAD_BASELINES, REPLICATE_KIND, Experiment, arm_label,
                         split_arm, variant_arm, variant_suffix)



def load_replicates(experiment: str | Path) -> pd.DataFrame:
    """One row per (complete replicate trial, partition), with `source_trial` (the sweep trial
    whose configuration it re-runs), `seed`, `arm` (cmg.results.ARMS; a variant run with
    overrides, tune.replicate --variant: "ARM + KEY=VALUE", cmg.results.variant_arm) and `run` (the
    call of tune.replicate); for a (configuration, seed, arm) run more than once, the latest
    complete trial. Empty when none."""
    exp = Experiment.open(experiment)
    frames = []
    for run in exp.replicate_runs():
        try:
            frames.append(load_trials(run, kind=REPLICATE_KIND, partitions=exp.partitions())
                          .assign(run=run.root))
        except NotAnExperiment:  # a call that was stopped before its first trial
            continue
    empty = pd.DataFrame(columns=["trial_id", "source_trial", "seed", "arm", "partition", "run"])
    if not frames:
        return empty
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"] == "complete"].rename(
        columns={"param_source_trial": "source_trial", "param_seed": "seed", "param_arm": "arm"})
    if df.empty:
        return empty
    # runs from before the control arms were all CMG
    df["arm"] = df["arm"].fillna("mixed") if "arm" in df else "mixed"
    if "param_variant" in df:
        df["arm"] = [variant_arm(arm, variant if isinstance(variant, str) else "")
                     for arm, variant in zip(df["arm"], df.pop("param_variant"))]
    df = df.sort_values(["run", "trial_number", "partition"])
    latest = df.drop_duplicates(["source_trial", "seed", "arm"], keep="last")[["run", "trial_id"]]
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


def sign_flip_p(values: pd.Series | list[float]) -> float:
    """The exact two-sided sign-flip (permutation) p of "the mean of `values` is 0", for paired
    differences symmetric about 0 under the null: the fraction of all 2^n assignments of signs to
    the n values whose |sum| reaches the observed |sum| (NaN for none). No normality assumed, but
    it cannot go below 2 / 2^n (`min_sign_flip_p`). Costs 2^n sums: fine to ~24 values."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        return float("nan")
    observed = abs(x.sum()) * (1 - 1e-12)  # ties (a sign flip of a 0, equal values) count
    bits = np.arange(len(x))
    hits, total, chunk = 0, 2 ** len(x), 2 ** 16
    for start in range(0, total, chunk):
        flips = (np.arange(start, min(start + chunk, total))[:, None] >> bits) & 1
        hits += int(np.count_nonzero(np.abs((1 - 2 * flips) @ x) >= observed))
    return hits / total


def min_sign_flip_p(n: int) -> float:
    """The smallest exact sign-flip p that n values can give: 2 / 2^n (all signs alike)."""
    return 2 / 2 ** n


def seeds_for_exact(alpha: float) -> int:
    """The fewest values whose exact sign-flip test can reach `alpha` (2 / 2^n <= alpha)."""
    return math.ceil(math.log2(2 / alpha) - 1e-12)


def detectable_effect(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The minimal detectable effect of the design: the true mean difference that a two-sided
    one-sample t-test of n values with sample sd `sd` finds at level `alpha` with probability
    `power` (the noncentral t, exact under normality; NaN for n < 2 or no sd)."""
    if n < 2 or not sd > 0:
        return float("nan")
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(effect: float) -> float:
        nc = effect * math.sqrt(n) / sd
        # the wrong-direction tail is below alpha / 2; scipy's nct gives NaN far out in it
        wrong_way = float(np.nan_to_num(stats.nct.cdf(-crit, df, nc)))
        return stats.nct.sf(crit, df, nc) + wrong_way - power

    high = sd
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=sd * 1e-9))


def equivalence_bound(values: pd.Series) -> float:
    """The largest mean difference the data do not rule out, TOST style: the upper end of the
    90% two-sided t-interval of the mean of `values` (a one-sided test at 0.05 rejects every
    larger difference). NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(values.mean() + stats.t.ppf(0.95, n - 1) * values.std(ddof=1) / n ** 0.5)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest p times
    (m - i + 1), made monotone, capped at 1 (NaN stays NaN and does not count in m)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def cmg_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The CMG runs (arm "mixed"; replicates from before the arms were all CMG)."""
    return df[df["arm"] == "mixed"] if "arm" in df else df


def _cells(group: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """One configuration's scores as columns, one row per (seed, partition) cell: CMG, the
    baselines, each control arm's score and the re-trained head's baselines (arm "none"), then
    the variants (tune.replicate --variant) alike. The cells are those every plain score ran; a
    variant that has not run on all of them yet is left out (it would shrink every comparison).
    With the labels of the variants' columns."""
    by_arm = {arm: rows.set_index(["seed", "partition"]) for arm, rows in group.groupby("arm")}
    if "mixed" not in by_arm:
        return pd.DataFrame(), set()
    mixed = by_arm["mixed"]
    cells = {"CMG": mixed["test_auroc"],
             **{label: mixed[f"{b}_test_auroc"] for b, label in BASELINES.items()}}
    variants = {}
    for name in sorted(by_arm, key=lambda n: (list(ARMS).index(split_arm(n)[0]), n)):
        arm, variant = split_arm(name)
        if name == "mixed":
            continue
        scores = variants if variant else cells
        suffix = variant_suffix(variant)
        scores[arm_label(name)] = by_arm[name]["test_auroc"]
        if arm == "none":
            scores.update({f"{label}, re-trained head{suffix}": by_arm[name][f"{h}_test_auroc"]
                           for h, label in zip(HEAD_BASELINES, BASELINES.values())
                           if f"{h}_test_auroc" in by_arm[name]})
    common = pd.DataFrame(cells).dropna()  # the cells that every plain score ran
    done = {label: values.reindex(common.index) for label, values in variants.items()}
    done = {label: v for label, v in done.items() if v.notna().all()}
    return common.assign(**done), set(done)


SELECTION_ROW = "CMG, selection seed (the sweep's own run, not a replicate)"


def replicate_table(df: pd.DataFrame, only: list[str] | None = None,
                    seeds: list[int] | None = None,
                    selection: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (configuration, score), lifts last; `only`/`seeds` restrict to those
    configurations and seeds (default: all replicated). `selection`: the sweep's trials
    (`load_trials`), for a row of CMG on the seed the configuration was chosen on (shown apart:
    never in a lift or a test)."""
    if df.empty:
        return pd.DataFrame()
    df = df.assign(arm=df["arm"] if "arm" in df else "mixed")
    if only is not None:
        df = df[df["source_trial"].isin(only)]
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    rows = []
    order = only if only is not None else list(dict.fromkeys(df["source_trial"]))
    for source in order:
        cells, variants = _cells(df[df["source_trial"] == source])
        if cells.empty:
            continue
        lifts = {f"lift vs {label}": cells["CMG"] - cells[label] for label in cells.columns[1:]}
        if selection is not None:
            rows.append(_selection_row(selection, source))
        first = len(rows)
        for label, values in {**dict(cells.items()), **lifts}.items():
            per_seed = values.groupby(level="seed").mean()
            low, high = t_interval(per_seed)
            row = {"configuration": source, "score": label, "seeds": len(per_seed),
                   "partitions": values.index.get_level_values("partition").nunique(),
                   "mean": values.mean(), "seed_sd": per_seed.std(ddof=1),
                   "seed_ci_low": low, "seed_ci_high": high, "p": float("nan"),
                   "p_exact": float("nan"), "upper": float("nan")}
            if label.startswith("lift") and len(per_seed) > 1:
                row.update(p=float(stats.ttest_1samp(per_seed, 0.0).pvalue),
                           p_exact=sign_flip_p(per_seed), upper=equivalence_bound(per_seed))
            rows.append(row)
        # the family: every lift but those over a variant (descriptive, like analysis.headline's)
        family = [r for r in rows[first:] if r["score"].removeprefix("lift vs ") not in variants]
        for row, p_holm in zip(family, holm([r["p"] for r in family])):
            row["p_holm"] = p_holm
            row["verdict"] = _verdict(row)
        for row in rows[first:]:
            if row not in family:
                row.update(p_holm=float("nan"),
                           verdict="a variant: in no Holm family" if row["p"] == row["p"] else "")
    return pd.DataFrame(rows)


def _selection_row(selection: pd.DataFrame, source: str) -> dict:
    """CMG's test AUROC on the sweep's own seed, over the partitions that trial finished."""
    values = selection.loc[selection["trial_id"] == source, "test_auroc"].astype(float)
    return {"configuration": source, "score": SELECTION_ROW, "seeds": 1,
            "partitions": len(values), "mean": values.mean(), "seed_sd": float("nan"),
            "seed_ci_low": float("nan"), "seed_ci_high": float("nan"), "p": float("nan"),
            "p_exact": float("nan"), "upper": float("nan"), "p_holm": float("nan"),
            "verdict": ""}


def _verdict(row: dict) -> str:
    if not row["score"].startswith("lift"):
        return ""
    versus = row["score"].removeprefix("lift vs ")
    if row["p_holm"] == row["p_holm"] and row["p_holm"] < 0.05:
        return f"CMG {'beats' if row['mean'] > 0 else 'is below'} {versus}"
    bound = ("" if pd.isna(row["upper"])
             else f"; no more than {row['upper']:+.4f} AUROC, the 90% upper bound")
    return f"CMG does not beat {versus} (not shown at Holm-adjusted 0.05{bound})"


def _span(low: float, high: float, sign: bool) -> str:
    if pd.isna(low):
        return "n/a"
    return f"[{low:+.4f}, {high:+.4f}]" if sign else f"[{low:.4f}, {high:.4f}]"


def replicate_markdown(table: pd.DataFrame) -> str:
    """One Markdown table per replicated configuration."""
    if table.empty:
        return "_No seed replicates yet: python -m tune.replicate EXPERIMENT --top 1._"
    parts = []
    for source, group in table.groupby("configuration", sort=False):
        first = group[group["score"] == "CMG"].iloc[0]
        lines = [{
            "test AUROC": row.score,
            "mean (seeds x partitions)": f"{row.mean:+.4f}" if row.score.startswith("lift")
            else f"{row.mean:.4f}",
            "between-seed sd": "n/a" if pd.isna(row.seed_sd) else f"{row.seed_sd:.4f}",
            "95% CI over seeds": _span(row.seed_ci_low, row.seed_ci_high,
                                       row.score.startswith("lift")),
            "p (Holm)": ("" if pd.isna(row.p) else f"{row.p:.3g}"
                         + ("" if pd.isna(row.p_holm) else f" ({row.p_holm:.3g})")),
            "exact p": "" if pd.isna(row.p_exact) else f"{row.p_exact:.3g}",
            "verdict": row.verdict,
        } for row in group.itertuples(index=False)]
        parts += [f"Configuration of trial `{source}`: {first.seeds} seeds x {first.partitions} "
                  "partitions, every cell seeded on its own; lifts paired within seed and "
                  "partition, p-values from the seed-level means (t-test, Holm-adjusted over "
                  "the table's lifts; exact: the sign-flip test over every assignment of "
                  "signs).", "",
                  pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(parts).rstrip()
