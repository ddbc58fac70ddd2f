"""The headline result of a replicated sweep: tuned CMG against the baselines of the same
classifiers and against CMG with the reference's defaults, per partition and on average, over
the seeds of `python -m tune.replicate EXPERIMENT --top 3 --seeds 3 --with-defaults`.

    python -m analysis.headline results/mnist-quick            # a report folder: print the table
    python -m analysis.headline results/mnist-quick --readme README.md   # and put it there

It reads only the report's files (`summary.csv` names the configurations, `replicates.csv`
holds their seed replicates), so a published report folder is enough. The tuned configuration
is the sweep's best complete one on validation (never on test); the defaults are its first
trial. Every number is a test metric of a new seed (the sweep's own seed, on which the
configuration was selected, is not among them).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

from analysis.replicates import cmg_rows, t_interval
from cmg.errors import OneLineParser, atomic_write, command_parser, exit_on_usage_error, fail
from cmg.results import BASELINES, REPLICATES_FILE

START = "<!-- headline: start (python -m analysis.headline DIR --readme README.md) -->"
END = "<!-- headline: end -->"
# the sweep's first trial: the reference's stage-2 knobs (sigma, mixing, margins, lr, pseudo-OOD per
# batch) at the budget's epochs, with distinct classes; not the reference's full recipe
TUNED, DEFAULTS = "CMG, tuned", "CMG, first trial"


def chosen_trials(summary: pd.DataFrame) -> tuple[str, str]:
    """(the best complete configuration on mean validation AUROC, the sweep's first trial)."""
    complete = summary[summary["status"] == "complete"]
    if complete.empty:
        raise ValueError("the sweep has no complete configuration")
    tuned = complete.sort_values("val_auroc_mean", ascending=False)["trial_id"].iloc[0]
    return tuned, summary.sort_values("trial_number")["trial_id"].iloc[0]


def _columns(replicates: pd.DataFrame, tuned: str, defaults: str) -> dict[str, pd.DataFrame]:
    """{score label: rows (seed, partition, auroc, fpr95)}: tuned CMG, the baselines of its
    classifiers, default CMG; only the (seed, partition) pairs that both configurations ran."""
    cmg = cmg_rows(replicates)
    rows = {trial: cmg[cmg["source_trial"] == trial].set_index(["seed", "partition"])
            for trial in (tuned, defaults)}
    if any(r.empty for r in rows.values()):
        missing = [t for t, r in rows.items() if r.empty]
        raise ValueError(f"no replicates of {', '.join(missing)}: run tune.replicate with "
                         "--with-defaults")
    pairs = rows[tuned].index.intersection(rows[defaults].index).sort_values()
    out = {TUNED: rows[tuned].loc[pairs, ["test_auroc", "test_fpr95"]]}
    for b, label in BASELINES.items():
        out[label] = rows[tuned].loc[pairs, [f"{b}_test_auroc", f"{b}_test_fpr95"]]
    out[DEFAULTS] = rows[defaults].loc[pairs, ["test_auroc", "test_fpr95"]]
    return {label: df.set_axis(["auroc", "fpr95"], axis=1) for label, df in out.items()}


def headline_table(replicates: pd.DataFrame, tuned: str, defaults: str) -> pd.DataFrame:
    """One row per partition and a last row "mean": each score's test AUROC and FPR95, the mean
    over seeds (the last row: over seeds and partitions), with `seeds`; AUROC's 95% t-interval
    over the seed-level means in the last row."""
    columns = _columns(replicates, tuned, defaults)
    any_rows = next(iter(columns.values()))
    partitions = sorted(any_rows.index.get_level_values("partition").unique())
    table = []
    for partition in [*partitions, "mean"]:
        row: dict = {"partition": partition}
        for label, df in columns.items():
            part = df if partition == "mean" else df.xs(partition, level="partition",
                                                        drop_level=False)
            row[f"{label} auroc"] = part["auroc"].mean()
            row[f"{label} fpr95"] = part["fpr95"].mean()
            if partition == "mean":
                low, high = t_interval(part["auroc"].groupby(level="seed").mean())
                row[f"{label} auroc_ci_low"], row[f"{label} auroc_ci_high"] = low, high
        row["seeds"] = any_rows.xs(partition, level="partition").shape[0] \
            if partition != "mean" else any_rows.index.get_level_values("seed").nunique()
        table.append(row)
    return pd.DataFrame(table)


def headline_lifts(replicates: pd.DataFrame, tuned: str, defaults: str) -> pd.DataFrame:
    """Tuned CMG's test AUROC minus each other score's, paired within (seed, partition): the
    mean over both and the 95% t-interval over the seed-level means."""
    columns = _columns(replicates, tuned, defaults)
    rows = []
    for label, df in columns.items():
        if label == TUNED:
            continue
        lift = columns[TUNED]["auroc"] - df["auroc"]
        low, high = t_interval(lift.groupby(level="seed").mean())
        rows.append({"over": label, "mean": lift.mean(), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def headline_markdown(report: str | Path) -> str:
    """The headline table and the lifts of a report folder, as Markdown."""
    report = Path(report)
    try:
        summary = pd.read_csv(report / "summary.csv")
        replicates = pd.read_csv(report / REPLICATES_FILE)
    except FileNotFoundError as err:
        fail(f"{err.filename} not found: pass a report folder of a replicated sweep "
             "(python -m tune.replicate, then python -m analysis.report)")
    try:
        tuned, defaults = chosen_trials(summary)
        table = headline_table(replicates, tuned, defaults)
        lifts = headline_lifts(replicates, tuned, defaults)
    except ValueError as err:
        fail(f"{report}: {err}")
    labels = [TUNED, *BASELINES.values(), DEFAULTS]
    lines = []
    for _, row in table.iterrows():
        is_mean = row["partition"] == "mean"
        out = {"partition": "**mean**" if is_mean else str(row["partition"])}
        for label in labels:
            auroc = f"{row[f'{label} auroc']:.4f}"
            if is_mean:
                auroc += (f" [{row[f'{label} auroc_ci_low']:.4f}, "
                          f"{row[f'{label} auroc_ci_high']:.4f}]")
            out[label] = f"{auroc} / {row[f'{label} fpr95']:.3f}"
        lines.append(out)
    seeds = int(table["seeds"].iloc[-1])
    lift_rows = [{"tuned CMG minus": r.over, "test AUROC lift": f"{r.mean:+.4f}",
                  "95% CI over seeds": f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"}
                 for r in lifts.itertuples(index=False)]
    return "\n".join([
        f"Test AUROC / FPR95, mean over {seeds} new seeds (the last row: over seeds and "
        f"partitions, with the 95% t-interval over the seed-level means); tuned = trial "
        f"`{tuned}`, first trial = `{defaults}` (the reference's stage-2 knobs at the budget's "
        "epochs, distinct classes).", "",
        pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True), "",
        pd.DataFrame(lift_rows).to_markdown(index=False, disable_numparse=True)])


def readme_section(text: str, table: str) -> str:
    """`text` (a README) with the part between START and END replaced by `table`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        fail(f"the README has no headline markers; add the lines {START!r} and {END!r}")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", text)


def build_parser() -> OneLineParser:
    p = command_parser("python -m analysis.headline", __doc__)
    p.add_argument("report", help="a report folder (python -m analysis.report's output)")
    p.add_argument("--readme", default=None,
                   help="also write the table into this file, between its headline markers")
    return p


@exit_on_usage_error
def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    table = headline_markdown(args.report)
    if args.readme:
        path = Path(args.readme)
        text = readme_section(path.read_text(), table)
        with atomic_write(path, "w") as handle:
            handle.write(text)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
