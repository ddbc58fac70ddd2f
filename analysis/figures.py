"""Figures of a sweep, as matplotlib Figures (no pyplot state: safe in scripts, tests, notebooks).

    df = load_trials(path); table = aggregate(df)
    history_figure(table).savefig("history.png")
    params_figure(table); partitions_figure(df, table); importance_figure(importance(path))
    scores = load_scores(path, trial_id); roc_figure(scores); scores_figure(scores)

Complete configurations (all partitions of the setting) are filled markers; incomplete ones (stopped early
by ASHA, running, or failed) are hollow, because their mean covers fewer partitions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from sklearn.metrics import roc_auc_score, roc_curve

from analysis.trial_files import score_columns
from analysis.trials import is_complete, leaderboard
from cmg.results import BASELINES
from cmg.errors import atomic_write

COLORS = {"msp": "tab:gray", "energy": "tab:brown", "maxlogit": "tab:purple"}
BASELINE_STYLE = {key: (label, COLORS.get(key, "black")) for key, label in BASELINES.items()}


def _scatter(ax, x, y, complete: pd.Series, color: str = "tab:blue") -> None:
    ax.scatter(x[complete], y[complete], color=color, label="all partitions", zorder=3)
    ax.scatter(x[~complete], y[~complete], facecolors="none", edgecolors=color,
               label="fewer partitions", zorder=3)


def _baseline_lines(ax, table: pd.DataFrame, part: str) -> None:
    for name, (label, color) in BASELINE_STYLE.items():
        value = table[f"{name}_{part}_auroc_mean"].mean()
        if not np.isnan(value):
            ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)


def history_figure(table: pd.DataFrame, by: str = "val_auroc") -> Figure:
    """Mean `by` of each configuration in the order Tune created them, the best complete one so
    far, and the baselines' mean over the same stage-1 models."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ordered = table.sort_values("trial_number")
    complete = is_complete(ordered)
    _scatter(ax, ordered["trial_number"], ordered[f"{by}_mean"], complete)
    best = ordered[f"{by}_mean"].where(complete)
    best = (best.cummin() if by.endswith("fpr95") else best.cummax()).ffill()
    ax.step(ordered["trial_number"], best, where="post", color="tab:green", label="best so far")
    if by.endswith("auroc"):
        _baseline_lines(ax, table, by.split("_")[0])
    ax.set(xlabel="trial (order of creation)", ylabel=f"mean {by} over partitions",
           title="Optimisation history")
    ax.legend(fontsize="small")
    return fig


def _is_log(values: pd.Series) -> bool:
    numeric = pd.to_numeric(values, errors="coerce").dropna()
    return len(numeric) > 1 and (numeric > 0).all() and numeric.max() / numeric.min() >= 20


def params_figure(table: pd.DataFrame, by: str = "val_auroc") -> Figure:
    """One panel per parameter that varies: its value against the configuration's mean `by`."""
    params = [c for c in table.columns if c.startswith("param_")
              and table[c].dropna().astype(str).nunique() > 1]
    cols = 3
    rows = max(1, -(-len(params) // cols))
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    complete = is_complete(table)
    for i, column in enumerate(params):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = table[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() == values.notna().sum() and values.dtype != bool:
            _scatter(ax, numeric, table[f"{by}_mean"], complete)
            if _is_log(values):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
        else:  # categorical: one column of points per choice
            labels = sorted(values.dropna().astype(str).unique())
            position = values.astype(str).map({label: k for k, label in enumerate(labels)})
            _scatter(ax, position, table[f"{by}_mean"], complete)
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=column.removeprefix("param_"), ylabel=f"mean {by}")
    if not params:
        fig.add_subplot().text(0.5, 0.5, "no parameter varies", ha="center")
    fig.suptitle("Parameters against the objective")
    return fig


def partitions_figure(df: pd.DataFrame, table: pd.DataFrame, top: int = 3,
                      by: str = "val_auroc") -> Figure:
    """Test AUROC per partition of the `top` configurations (ranked on validation) against
    the baselines (cmg.results.BASELINES) from the same stage-1 classifiers."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    board = leaderboard(table, by=by).head(top)
    for rank, trial_id in enumerate(board["trial_id"], start=1):
        rows = df[df["trial_id"] == trial_id].sort_values("partition")
        ax.plot(rows["partition"], rows["test_auroc"], marker="o", label=f"#{rank} {trial_id}")
        if rank == 1:
            _interval(ax, table.set_index("trial_id").loc[trial_id])
            for name, (label, color) in BASELINE_STYLE.items():
                ax.plot(rows["partition"], rows[f"{name}_test_auroc"], marker="s",
                        linestyle="--", color=color, label=label)
    if board.empty:
        ax.text(0.5, 0.5, "no configuration finished all its partitions", ha="center",
                transform=ax.transAxes)
    ax.set_xticks(sorted(df["partition"].dropna().unique().astype(int)))
    ax.set(xlabel="partition", ylabel="test AUROC",
           title=f"Top configurations (ranked on {by}) against the baselines")
    ax.legend(fontsize="small")
    return fig


def _interval(ax, best: pd.Series) -> None:
    """The best configuration's mean test AUROC over partitions and its 95% t-interval."""
    ax.axhline(best["test_auroc_mean"], color="tab:blue", linewidth=0.8, linestyle=":",
               label="#1 mean over partitions")
    if pd.notna(best["test_auroc_ci_low"]):
        ax.axhspan(best["test_auroc_ci_low"], best["test_auroc_ci_high"], color="tab:blue",
                   alpha=0.1, label="#1 mean, 95% CI")


def importance_figure(importances: pd.DataFrame) -> Figure:
    """Horizontal bars of `analysis.importance`'s table, most important on top."""
    fig = Figure(figsize=(6, max(2.5, 0.35 * len(importances) + 1)), layout="constrained")
    ax = fig.add_subplot()
    ordered = importances.iloc[::-1]
    ax.barh(ordered["param"], ordered["importance"], color="tab:blue")
    if importances.empty:
        ax.text(0.5, 0.5, "needs two or more complete configurations", ha="center",
                transform=ax.transAxes)
    ax.set(xlabel="importance (fANOVA)", title="Parameter importances")
    return fig


def _panels(scores: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, test rows: IND and one OOD group) per partition, or per OOD set in Setting 2."""
    test = scores[scores["split"] == "test"]
    ood_kinds = [k for k in test["kind"].unique() if k != "ind"]
    if ood_kinds != ["ood"]:  # Setting 2: one panel per OOD set, against the same IND images
        return [(kind, test[test["kind"].isin(["ind", kind])]) for kind in ood_kinds]
    return [(f"partition {p}", rows) for p, rows in test.groupby("partition")]


def _style(name: str) -> tuple[str, str | None]:
    return ("CMG", "tab:blue") if name == "cmg" else BASELINE_STYLE.get(name, (name, None))


def _grid(n: int, cols: int = 5) -> tuple[int, int]:
    return max(1, -(-n // cols)), min(max(n, 1), cols)


def roc_figure(scores: pd.DataFrame) -> Figure:
    """Test ROC curves (OOD positive) of CMG and every baseline in a trial's scores files, one
    panel per partition (Setting 2: per OOD set), each curve labelled with its AUROC."""
    panels = _panels(scores)
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), layout="constrained")
    for i, (title, part) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        is_ood = part["kind"] != "ind"
        for name in score_columns(scores):
            fpr, tpr, _ = roc_curve(is_ood, part[name])
            label, color = _style(name)
            ax.plot(fpr, tpr, color=color, label=f"{label} {roc_auc_score(is_ood, part[name]):.3f}")
        ax.plot([0, 1], [0, 1], color="lightgray", linewidth=0.8)
        ax.set(title=title, xlabel="false positive rate (IND flagged)",
               ylabel="true positive rate (OOD flagged)" if i % cols == 0 else None)
        ax.legend(fontsize="x-small", loc="lower right", title="test AUROC",
                  title_fontsize="x-small")
    fig.suptitle("ROC curves of the best configuration on the test images")
    return fig


def scores_figure(scores: pd.DataFrame) -> Figure:
    """Histograms of the test scores of IND and OOD images: CMG (top row) and the baseline with
    the best mean test AUROC over the panels (bottom row), per partition or OOD set."""
    panels = _panels(scores)
    baselines = [c for c in score_columns(scores) if c != "cmg"]
    mean_auroc = {b: np.mean([roc_auc_score(p["kind"] != "ind", p[b]) for _, p in panels])
                  for b in baselines}
    shown = ["cmg"] + ([max(mean_auroc, key=mean_auroc.get)] if baselines else [])
    fig = Figure(figsize=(3.2 * len(panels), 2.6 * len(shown)), layout="constrained")
    for r, name in enumerate(shown):
        for c, (title, part) in enumerate(panels):
            ax = fig.add_subplot(len(shown), len(panels), r * len(panels) + c + 1)
            values = part[name].to_numpy(dtype=float)
            bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=40)
            for kind, color in (("ind", "tab:green"), ("ood", "tab:red")):
                chosen = (part["kind"] == "ind") if kind == "ind" else (part["kind"] != "ind")
                ax.hist(values[chosen.to_numpy()], bins=bins, density=True, alpha=0.5,
                        color=color, label=kind.upper())
            ax.set_title(f"{_style(name)[0]}, {title}")
            ax.locator_params(axis="x", nbins=4)
            if c == 0:
                ax.set_ylabel("density")
                ax.legend(fontsize="x-small")
    fig.suptitle("Test scores of IND and OOD images (higher = more OOD): CMG against the best "
                 "baseline")
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically (no half-written image if interrupted)."""
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    return Path(path)
