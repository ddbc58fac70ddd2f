"""The headline result of replicated sweeps: tuned CMG against its control arms, CMG with the
reference's defaults and the baselines of the same classifiers, over independent seeds, for
each way the configuration was selected; and the lifts that answer the questions, with
Holm-adjusted p-values and a verdict sentence each.

    python -m analysis.headline results/mnist-quick-unseen results/mnist-quick-blind
    python -m analysis.headline REPORT [REPORT ...] --readme README.md   # and put it there

Each REPORT is a report folder (python -m analysis.report) of a sweep replicated with
`python -m tune.replicate EXPERIMENT --top 1 --seeds 5 --with-defaults` (every control arm by
default). It reads only the folder's files: `summary.csv` names the configurations,
`replicates.csv` holds their seed replicates, `trials.parquet` the selection seed's run and
`manifest.json` (if there) what selection saw (`data.val_ood`). The tuned configuration is the
sweep's best complete one on validation (never on test); the defaults are its first trial.
Every number in the table is a test metric of a new seed; the sweep's own seed, on which the
configuration was selected, is shown apart and tested in nothing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
from scipy import stats

from analysis.replicates import holm, t_interval
from cmg.errors import OneLineParser, atomic_write, command_parser, exit_on_usage_error, fail
from cmg.results import ARMS, BASELINES, REPLICATES_FILE

START = "<!-- headline: start (python -m analysis.headline DIR --readme README.md) -->"
END = "<!-- headline: end -->"
# the sweep's first trial: the reference's stage-2 knobs (sigma, mixing, margins, lr, pseudo-OOD per
# batch) at the budget's epochs, with distinct classes; not the reference's full recipe
TUNED, DEFAULTS = "CMG, tuned", "CMG, first trial"
SELECTIONS = {"unseen": "selected on held-out images of the unseen classes",
              "rotated": "selected blind (rotated IND validation images)"}
# the questions, each a lift of tuned CMG over one score, fixed before reading any number:
# (question, the score CMG is compared with)
QUESTIONS = (("Does class mixing add anything beyond pseudo-OOD without it?", ARMS["single"]),
             ("Does CMG add anything beyond re-training the head?", ARMS["none"]),
             ("Does tuned CMG beat max-logit?", BASELINES["maxlogit"]),
             ("Does tuning beat the reference's defaults?", DEFAULTS))


def chosen_trials(summary: pd.DataFrame) -> tuple[str, str]:
    """(the best complete configuration on mean validation AUROC, the sweep's first trial)."""
    complete = summary[summary["status"] == "complete"]
    if complete.empty:
        raise ValueError("the sweep has no complete configuration")
    tuned = complete.sort_values("val_auroc_mean", ascending=False)["trial_id"].iloc[0]
    return tuned, summary.sort_values("trial_number")["trial_id"].iloc[0]


def score_cells(replicates: pd.DataFrame, tuned: str, defaults: str) -> dict[str, pd.DataFrame]:
    """{score: its test auroc and fpr95 per (seed, partition) cell}: tuned CMG, its control arms
    (those run), the defaults' CMG and the baselines of the tuned runs' classifiers; only the
    cells that every score ran."""
    df = replicates.assign(arm=replicates["arm"] if "arm" in replicates else "mixed")
    runs = {(trial, arm): rows.set_index(["seed", "partition"])
            for (trial, arm), rows in df.groupby(["source_trial", "arm"])}
    missing = [t for t in (tuned, defaults) if (t, "mixed") not in runs]
    if missing:
        raise ValueError(f"no replicates of {', '.join(missing)}: run tune.replicate with "
                         "--with-defaults")
    mixed = runs[(tuned, "mixed")]
    out = {TUNED: mixed[["test_auroc", "test_fpr95"]]}
    for arm in (a for a in ARMS if a != "mixed" and (tuned, a) in runs):
        out[ARMS[arm]] = runs[(tuned, arm)][["test_auroc", "test_fpr95"]]
    out[DEFAULTS] = runs[(defaults, "mixed")][["test_auroc", "test_fpr95"]]
    for b, label in BASELINES.items():
        out[label] = mixed[[f"{b}_test_auroc", f"{b}_test_fpr95"]]
    cells = out[TUNED].index
    for frame in out.values():
        cells = cells.intersection(frame.index)
    return {label: frame.loc[cells.sort_values()].set_axis(["auroc", "fpr95"], axis=1)
            for label, frame in out.items()}


def score_summary(cells: pd.DataFrame) -> dict[str, float]:
    """A score's mean test AUROC and FPR95 over the cells, and AUROC's 95% t-interval over the
    seed-level means (the seeds are the independent units)."""
    low, high = t_interval(cells["auroc"].groupby(level="seed").mean())
    return {"auroc": cells["auroc"].mean(), "fpr95": cells["fpr95"].mean(),
            "ci_low": low, "ci_high": high}


def lift(tuned: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """Tuned CMG's test AUROC minus `other`'s, paired within (seed, partition): the mean over
    the cells, the 95% t-interval over the seed-level means and the two-sided one-sample
    t-test of those means against 0."""
    per_seed = (tuned["auroc"] - other["auroc"]).groupby(level="seed").mean()
    low, high = t_interval(per_seed)
    p = float(stats.ttest_1samp(per_seed, 0.0).pvalue) if len(per_seed) > 1 else float("nan")
    return {"mean": (tuned["auroc"] - other["auroc"]).mean(), "ci_low": low, "ci_high": high,
            "p": p}


def _read_report(report: Path) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(what selection saw, summary.csv, replicates.csv, trials.parquet or None)."""
    try:
        summary = pd.read_csv(report / "summary.csv", dtype={"trial_id": str})
        replicates = pd.read_csv(report / REPLICATES_FILE, dtype={"source_trial": str})
    except FileNotFoundError as err:
        fail(f"{err.filename} not found: pass a report folder of a replicated sweep "
             "(python -m tune.replicate, then python -m analysis.report)")
    # a published folder holds a copy of the manifest; EXPERIMENT/report has it one level up
    manifest = next((m for m in (report / "manifest.json", report.parent / "manifest.json")
                     if m.exists()), report / "manifest.json")
    val_ood = (json.loads(manifest.read_text())["run_config"]["data"].get("val_ood", "unseen")
               if manifest.exists() else "unseen")
    trials = report / "trials.parquet"
    return val_ood, summary, replicates, pd.read_parquet(trials) if trials.exists() else None


def headline(reports: list[str | Path]) -> dict:
    """Every report's chosen trials, score summaries, selection-seed AUROC and lifts, with
    Holm's adjustment over all the lifts of all the reports (the family: QUESTIONS that were
    run, per selection)."""
    out = []
    for report in map(Path, reports):
        val_ood, summary, replicates, trials = _read_report(report)
        try:
            tuned, defaults = chosen_trials(summary)
            cells = score_cells(replicates, tuned, defaults)
        except ValueError as err:
            fail(f"{report}: {err}")
        seed_run = (trials.loc[trials["trial_id"] == tuned, "test_auroc"].mean()
                    if trials is not None else float("nan"))
        index = cells[TUNED].index
        out.append({
            "report": report, "selection": val_ood, "tuned": tuned, "defaults": defaults,
            "seeds": index.get_level_values("seed").nunique(),
            "partitions": index.get_level_values("partition").nunique(),
            "scores": {label: score_summary(c) for label, c in cells.items()},
            "selection_seed": seed_run,
            "lifts": {versus: lift(cells[TUNED], cells[versus]) for _, versus in QUESTIONS
                      if versus in cells}})
    lifts = [one for r in out for one in r["lifts"].values()]
    for one, adjusted in zip(lifts, holm([one["p"] for one in lifts])):
        one["p_holm"] = adjusted
    return {"reports": out, "family": sum(one["p"] == one["p"] for one in lifts)}


def _verdict(versus: str, one: dict) -> str:
    """The answer the numbers give, read at Holm-adjusted 0.05."""
    numbers = (f"{one['mean']:+.4f} [{one['ci_low']:+.4f}, {one['ci_high']:+.4f}], Holm p "
               f"{one['p_holm']:.3g}")
    if one["p_holm"] == one["p_holm"] and one["p_holm"] < 0.05:
        return f"yes, {numbers}" if one["mean"] > 0 else f"no, CMG is below it: {numbers}"
    return f"does not, {numbers}"


def headline_markdown(reports: list[str | Path]) -> str:
    """The headline of the report folders, as Markdown: the scores table (one column per
    selection), the selection seeds apart, the lifts and one verdict per question."""
    result = headline(reports)
    runs = result["reports"]
    column = {id(r): f"{SELECTIONS.get(r['selection'], r['selection'])}, trial `{r['tuned']}`"
              for r in runs}
    labels = list(dict.fromkeys(label for r in runs for label in r["scores"]))
    table = [{"test AUROC [95% CI over seeds] / FPR95": label,
              **{column[id(r)]: (f"{s['auroc']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}] / "
                                 f"{s['fpr95']:.3f}" if (s := r["scores"].get(label)) else "not run")
                 for r in runs}} for label in labels]
    lift_rows, verdicts, not_run = [], [], []
    for question, versus in QUESTIONS:
        answers = []
        for r in runs:
            one = r["lifts"].get(versus)
            if one is None:
                continue
            where = SELECTIONS.get(r["selection"], r["selection"])
            lift_rows.append({"tuned CMG minus": versus, "selection": where,
                              "lift (mean)": f"{one['mean']:+.4f}",
                              "95% CI over seeds": f"[{one['ci_low']:+.4f}, {one['ci_high']:+.4f}]",
                              "p (Holm)": f"{one['p']:.3g} ({one['p_holm']:.3g})"})
            answers.append(f"{where}: {_verdict(versus, one)}")
        if answers:
            verdicts.append(f"- **{question}** " + "; ".join(answers) + ".")
        else:
            not_run.append(question)
    if not_run:  # its score was not replicated (an arm, or the first trial)
        verdicts.append(f"- Not run in these replicates, so not answered: {' '.join(not_run)}")
    first = runs[0]
    seeds = ", ".join(f"{SELECTIONS.get(r['selection'], r['selection'])}: "
                      f"{r['selection_seed']:.4f}" for r in runs)
    return "\n".join([
        f"Mean over {first['seeds']} new seeds x {first['partitions']} partitions, every (seed, "
        "partition) cell seeded on its own; the first trial is "
        + ", ".join(f"`{r['defaults']}`" for r in runs)
        + " (the reference's stage-2 knobs at the budget's epochs, distinct classes); the "
        "baselines are those of the tuned runs' classifiers. Tuned CMG on the seed it was "
        f"selected on (the sweep's own run, in no test): {seeds}. Lifts are paired within (seed, "
        "partition); p: t-test of the seed-level mean lifts against 0, Holm-adjusted over the "
        f"{result['family']} lifts of the second table.", "",
        pd.DataFrame(table).to_markdown(index=False, disable_numparse=True), "",
        pd.DataFrame(lift_rows).to_markdown(index=False, disable_numparse=True), "",
        *verdicts])


def readme_section(text: str, table: str) -> str:
    """`text` (a README) with the part between START and END replaced by `table`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        fail(f"the README has no headline markers; add the lines {START!r} and {END!r}")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", text)


def build_parser() -> OneLineParser:
    p = command_parser("python -m analysis.headline", __doc__)
    p.add_argument("reports", nargs="+", metavar="REPORT",
                   help="report folders (python -m analysis.report's output), one per selection")
    p.add_argument("--readme", default=None,
                   help="also write the table into this file, between its headline markers")
    return p


@exit_on_usage_error
def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    table = headline_markdown(args.reports)
    if args.readme:
        path = Path(args.readme)
        text = readme_section(path.read_text(), table)
        with atomic_write(path, "w") as handle:
            handle.write(text)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
