"""The headline result of replicated sweeps: tuned CMG against its control arms, CMG with the
reference's defaults and the baselines of the same classifiers, over independent seeds, for
each way the configuration was selected; and the lifts that answer the questions, each with its
Holm-adjusted t-test, an exact sign-flip test, the smallest lift the design detects and, where no
lift is shown, the largest one the data leave open; a verdict sentence each; and every searched
knob of a selected configuration that sits on an edge of its range (analysis.edges).

    python -m analysis.headline results/mnist-quick-unseen results/mnist-quick-blind
    python -m analysis.headline REPORT [REPORT ...] --readme README.md   # and put it there

Each REPORT is a report folder (python -m analysis.report) of a sweep replicated with
`python -m tune.replicate EXPERIMENT --top 1 --seeds 5 --with-defaults` (every control arm by
default). It reads only the folder's files: `summary.csv` names the configurations,
`replicates.csv` holds their seed replicates, `trials.parquet` the selection seed's run and
`manifest.json` (if there) what selection saw (`data.val_ood`) and the searched space. The tuned
configuration is the sweep's best complete one on validation (never on test); the defaults are its
first trial. A control arm is compared as its replicates ran it: at its own tuned configuration
(a source trial of its own, from a sweep of that arm) where there is one, else at tuned CMG's
knobs, and its label says which. A variant of an arm (`tune.replicate --arms none --variant
stage2.label_smoothing=0`) is a score of its own beside the arms, and its difference from the arm
as the sweep ran it a descriptive line, outside the questions and their Holm family; it shows once
it has run on every cell the others ran.
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

from analysis.edges import EDGE, edges
from analysis.replicates import (detectable_effect, equivalence_bound, holm, min_sign_flip_p,
                                 seeds_for_exact, sign_flip_p, t_interval)
from cmg.errors import OneLineParser, atomic_write, command_parser, exit_on_usage_error, fail
from cmg.results import ARMS, BASELINES, REPLICATES_FILE, arm_label, split_arm

START = "<!-- headline: start (python -m analysis.headline DIR --readme README.md) -->"
END = "<!-- headline: end -->"
# the sweep's first trial: the reference's stage-2 knobs (sigma, mixing, margins, lr, pseudo-OOD per
# batch) at the budget's epochs, with distinct classes; not the reference's full recipe
TUNED, DEFAULTS = "CMG, tuned", "CMG, first trial"
AT_CMGS = "at tuned CMG's knobs"  # a control arm run at CMG's configuration, not at its own
CONTROLS = tuple(a for a in ARMS if a != "mixed")
SELECTIONS = {"unseen": "selected on held-out images of the unseen classes",
              "rotated": "selected blind (rotated IND validation images)"}
# the questions, each a lift of tuned CMG over one score, fixed before reading any number:
# (question, the score CMG is compared with: a control arm, a baseline or "defaults")
QUESTIONS = (("Does class mixing add anything beyond pseudo-OOD without it?", "single"),
             ("Does CMG add anything beyond uniform-noise pseudo-OOD?", "noise"),
             ("Does CMG add anything beyond re-training the head?", "none"),
             ("Does tuned CMG beat max-logit?", "maxlogit"),
             ("Does tuning beat the reference's defaults?", "defaults"))
ALPHA, POWER = 0.05, 0.8  # the family's level (Holm) and the power of the detectable effect


def chosen_trials(summary: pd.DataFrame) -> tuple[str, str]:
    """(the best complete configuration on mean validation AUROC, the sweep's first trial): of
    CMG's study, EXPERIMENT itself (tune.sweep --arms keeps each control arm's study apart, in
    EXPERIMENT/arm-<arm>)."""
    complete = summary[summary["status"] == "complete"]
    if complete.empty:
        raise ValueError("the sweep has no complete configuration")
    tuned = complete.sort_values("val_auroc_mean", ascending=False)["trial_id"].iloc[0]
    return tuned, summary.sort_values("trial_number")["trial_id"].iloc[0]


def _params(replicates: pd.DataFrame, source: str) -> dict:
    """The searched knobs a configuration's replicates ran ({name: value}, drawn ones only)."""
    rows = replicates[replicates["source_trial"] == source]
    if rows.empty:
        return {}
    return {k.removeprefix("param_"): v for k, v in rows.iloc[0].items()
            if k.startswith("param_") and pd.notna(v)}


def arm_configurations(replicates: pd.DataFrame, tuned: str,
                       defaults: str) -> dict[str, tuple[str, bool]]:
    """{control arm: (the configuration its replicates ran, whether it is the arm's own)}: the
    arm's own tuned configuration (a source trial other than CMG's) where one was replicated,
    else tuned CMG's; arms not replicated are left out. An arm's own first trial, replicated
    beside its best, is told apart by holding the first trial's knobs."""
    df = replicates.assign(arm=replicates["arm"] if "arm" in replicates else "mixed")
    first = _params(df, defaults)
    out = {}
    for arm in CONTROLS:
        sources = list(dict.fromkeys(df.loc[df["arm"] == arm, "source_trial"]))
        own = [s for s in sources if s not in (tuned, defaults)]
        if len(own) > 1:
            own = [s for s in own if any(first.get(k) != v
                                         for k, v in _params(df, s).items())] or own
        if len(own) > 1:
            raise ValueError(f"arm '{arm}' has replicates of several configurations "
                             f"({', '.join(own)}): replicate one best configuration per arm")
        if own or tuned in sources:
            out[arm] = (own[0], True) if own else (tuned, False)
    return out


def labels(arms: dict[str, tuple[str, bool]], variants=()) -> dict[str, str]:
    """{score key: the label tables print}: tuned CMG, each arm run (tuned, or at CMG's knobs),
    each variant of one (`variant_cells`' keys) alike, the first trial and the baselines."""
    runs = {**{arm: arm for arm in arms}, **{name: split_arm(name)[0] for name in variants}}
    return {"mixed": TUNED,
            **{name: f"{arm_label(name)}, {'tuned' if arms[arm][1] else AT_CMGS}"
               for name, arm in runs.items()},
            "defaults": DEFAULTS, **BASELINES}


def score_cells(replicates: pd.DataFrame, tuned: str, defaults: str,
                arms: dict[str, tuple[str, bool]]) -> dict[str, pd.DataFrame]:
    """{score key: its test auroc and fpr95 per (seed, partition) cell}: tuned CMG ("mixed"),
    each control arm of `arms` (`arm_configurations`), the defaults' CMG ("defaults") and the
    baselines of the tuned runs' classifiers (BASELINES' keys); only the cells every score ran."""
    df = replicates.assign(arm=replicates["arm"] if "arm" in replicates else "mixed")
    runs = {(trial, arm): rows.set_index(["seed", "partition"])
            for (trial, arm), rows in df.groupby(["source_trial", "arm"])}
    missing = [t for t in (tuned, defaults) if (t, "mixed") not in runs]
    if missing:
        raise ValueError(f"no replicates of {', '.join(missing)}: run tune.replicate with "
                         "--with-defaults")
    mixed = runs[(tuned, "mixed")]
    out = {"mixed": mixed[["test_auroc", "test_fpr95"]]}
    for arm, (source, _) in arms.items():
        out[arm] = runs[(source, arm)][["test_auroc", "test_fpr95"]]
    out["defaults"] = runs[(defaults, "mixed")][["test_auroc", "test_fpr95"]]
    for b in BASELINES:
        out[b] = mixed[[f"{b}_test_auroc", f"{b}_test_fpr95"]]
    cells = out["mixed"].index
    for frame in out.values():
        cells = cells.intersection(frame.index)
    _same_classifier(mixed, [runs[(source, arm)] for arm, (source, _) in arms.items()]
                     + [runs[(defaults, "mixed")]], cells)
    return {key: frame.loc[cells.sort_values()].set_axis(["auroc", "fpr95"], axis=1)
            for key, frame in out.items()}


def _same_classifier(tuned: pd.DataFrame, others: list[pd.DataFrame], cells: pd.Index) -> None:
    """ValueError unless every run compared with tuned CMG ran each cell on its classifier: the
    same weights, not only the same key (`stage1_weights`' first part; rows from before it was
    recorded pass)."""
    if "stage1_weights" not in tuned:
        return

    def classifier(rows: pd.DataFrame) -> pd.Series:  # all empty in a CSV: floats, so as text
        return rows.loc[cells, "stage1_weights"].astype("string").str.partition("+")[0]

    mine = classifier(tuned)
    for other in others:
        theirs = classifier(other)
        differ = mine.notna() & theirs.notna() & (mine != theirs)
        if differ.any():
            raise ValueError(
                f"cells {', '.join(f'seed {s} partition {p}' for s, p in mine.index[differ])} ran "
                "their arms on different stage-1 weights of the same key (models trained again "
                "on another machine): run tune.replicate again, which re-runs them on the "
                "store's")


def variant_cells(replicates: pd.DataFrame, arms: dict[str, tuple[str, bool]],
                  index: pd.Index, tuned: str) -> dict[str, pd.DataFrame]:
    """{variant name ("none + stage2.label_smoothing=0"): its test auroc and fpr95 on the cells
    of `index`}: each variant of an arm of `arms` at the configuration the arm ran, that has run
    on every one of those cells (one still running is left out, not allowed to shrink them);
    ValueError if it ran a cell on other classifier weights than `tuned` CMG did."""
    df = replicates.assign(arm=replicates["arm"] if "arm" in replicates else "mixed")
    mixed = df[(df["source_trial"] == tuned) & (df["arm"] == "mixed")]
    out = {}
    for name, rows in df.groupby("arm"):
        arm, variant = split_arm(name)
        if not variant or arm not in arms:
            continue
        frame = rows[rows["source_trial"] == arms[arm][0]].set_index(["seed", "partition"])
        if index.isin(frame.index).all():
            _same_classifier(mixed.set_index(["seed", "partition"]), [frame], index)
            out[name] = frame.loc[index, ["test_auroc", "test_fpr95"]].set_axis(
                ["auroc", "fpr95"], axis=1)
    return out


def score_summary(cells: pd.DataFrame) -> dict[str, float]:
    """A score's mean test AUROC and FPR95 over the cells, and AUROC's 95% t-interval over the
    seed-level means (the seeds are the independent units)."""
    low, high = t_interval(cells["auroc"].groupby(level="seed").mean())
    return {"auroc": cells["auroc"].mean(), "fpr95": cells["fpr95"].mean(),
            "ci_low": low, "ci_high": high}


def lift(tuned: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """Tuned CMG's test AUROC minus `other`'s, paired within (seed, partition): the mean over
    the cells; over the n seed-level means, their sd, the 95% t-interval, the two-sided
    one-sample t-test against 0 (`p`), the exact sign-flip p (`p_exact`) and the upper end of
    the 90% t-interval (`upper`: no larger lift is left open, TOST style)."""
    per_seed = (tuned["auroc"] - other["auroc"]).groupby(level="seed").mean()
    low, high = t_interval(per_seed)
    p = float(stats.ttest_1samp(per_seed, 0.0).pvalue) if len(per_seed) > 1 else float("nan")
    return {"mean": (tuned["auroc"] - other["auroc"]).mean(), "ci_low": low, "ci_high": high,
            "p": p, "p_exact": sign_flip_p(per_seed), "n": len(per_seed),
            "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan"),
            "upper": equivalence_bound(per_seed)}


def _read_report(report: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(manifest.json or {}, summary.csv, replicates.csv, trials.parquet or None)."""
    if not report.is_dir():
        fail(f"{report} is not a folder: pass report folders (python -m analysis.report "
             "EXPERIMENT writes EXPERIMENT/report) of replicated sweeps")
    try:
        summary = pd.read_csv(report / "summary.csv", dtype={"trial_id": str})
        replicates = pd.read_csv(report / REPLICATES_FILE, dtype={"source_trial": str})
    except FileNotFoundError as err:
        fail(f"{err.filename} not found: pass a report folder of a replicated sweep "
             "(python -m tune.replicate, then python -m analysis.report)")
    # a published folder holds a copy of the manifest; EXPERIMENT/report has it one level up
    manifest = next((m for m in (report / "manifest.json", report.parent / "manifest.json")
                     if m.exists()), None)
    trials = report / "trials.parquet"
    return (json.loads(manifest.read_text()) if manifest else {}, summary, replicates,
            pd.read_parquet(trials) if trials.exists() else None)


def headline(reports: list[str | Path]) -> dict:
    """Every report's chosen trials, score summaries, selection-seed AUROC, lifts and edges, with
    Holm's adjustment (of the t-tests and, apart, of the exact tests) over all the lifts of all
    the reports (the family: QUESTIONS that were run, per selection), and each lift's detectable
    effect at Holm's strictest step, ALPHA / the family's size."""
    out = []
    for report in map(Path, reports):
        manifest, summary, replicates, trials = _read_report(report)
        try:
            tuned, defaults = chosen_trials(summary)
            arms = arm_configurations(replicates, tuned, defaults)
            cells = score_cells(replicates, tuned, defaults, arms)
            variants = variant_cells(replicates, arms, cells["mixed"].index, tuned)
        except ValueError as err:
            fail(f"{report}: {err}")
        seed_run = (trials.loc[trials["trial_id"] == tuned, "test_auroc"].mean()
                    if trials is not None else float("nan"))
        index = cells["mixed"].index
        configurations = {"mixed": tuned, **{arm: s for arm, (s, own) in arms.items() if own}}
        names = labels(arms, variants)
        out.append({
            "report": report, "tuned": tuned, "defaults": defaults, "labels": names,
            "selection": manifest.get("run_config", {}).get("data", {}).get("val_ood", "unseen"),
            "seeds": index.get_level_values("seed").nunique(),
            "partitions": index.get_level_values("partition").nunique(),
            "scores": {key: score_summary(c) for key, c in {**cells, **variants}.items()},
            # a variant minus its arm as the sweep ran it (descriptive: in no family)
            "variants": {name: lift(frame, cells[split_arm(name)[0]])
                         for name, frame in variants.items()},
            "selection_seed": seed_run,
            "lifts": {versus: lift(cells["mixed"], cells[versus]) for _, versus in QUESTIONS
                      if versus in cells},
            "edges": {(names[key], source): found for key, source in configurations.items()
                      if (found := edges(_params(replicates, source), manifest.get("space")))}})
    lifts = [one for r in out for one in r["lifts"].values()]
    family = sum(one["p"] == one["p"] for one in lifts)
    for key in ("p", "p_exact"):
        for one, adjusted in zip(lifts, holm([one[key] for one in lifts])):
            one[f"{key}_holm"] = adjusted
    for one in lifts:
        one["detectable"] = detectable_effect(one["sd"], one["n"], ALPHA / max(family, 1), POWER)
    return {"reports": out, "family": family}


def _verdict(one: dict) -> str:
    """The answer the numbers give, read at Holm-adjusted ALPHA; "does not" carries the largest
    lift left open and the smallest the design detects."""
    numbers = (f"{one['mean']:+.4f} [{one['ci_low']:+.4f}, {one['ci_high']:+.4f}], Holm p "
               f"{one['p_holm']:.3g}, exact p {one['p_exact']:.3g} "
               f"(Holm {one['p_exact_holm']:.3g})")
    if one["p_holm"] == one["p_holm"] and one["p_holm"] < ALPHA:
        exact = "" if one["p_exact_holm"] < ALPHA else ", not shown by the exact test"
        return (f"yes, {numbers}{exact}" if one["mean"] > 0
                else f"no, CMG is below it: {numbers}{exact}")
    return (f"does not, {numbers}: no more than {one['upper']:+.4f} AUROC (90% upper bound), "
            f"and the design detects {one['detectable']:.4f} at {POWER:.0%} power")


def _exact_note(result: dict) -> str:
    """A sentence when too few seeds let the exact test pass Holm's strictest step, else ""."""
    step = ALPHA / max(result["family"], 1)
    seeds = min((one["n"] for r in result["reports"] for one in r["lifts"].values()), default=0)
    if not seeds or min_sign_flip_p(seeds) <= step:
        return ""
    return (f" With {seeds} seeds the exact test cannot go below 2/2^{seeds} = "
            f"{min_sign_flip_p(seeds):.3g}, above Holm's strictest step {ALPHA}/"
            f"{result['family']} = {step:.3g}, so it can show no lift and every \"yes\" rests on "
            f"the t-test's normality; {seeds_for_exact(step)} seeds would let it.")


def _edge_line(runs: list[dict]) -> list[str]:
    """One item naming every selected configuration's knobs on an edge of the searched range
    (within analysis.edges.EDGE of it); none: no line at all."""
    found = [f"{SELECTIONS.get(r['selection'], r['selection'])}, {label} (trial `{source}`): "
             + "; ".join(edge.line() for edge in edges_)
             for r in runs for (label, source), edges_ in r["edges"].items()]
    if not found:
        return []
    return [f"- **Selected configurations on an edge of the searched range** (within "
            f"{EDGE:.0%} of it, in log space for log knobs; the range, not the method, may have "
            "stopped the search): " + "; ".join(found) + "."]


def _lift_cell(one: dict) -> str:
    return (f"{one['mean']:+.4f} [{one['ci_low']:+.4f}, {one['ci_high']:+.4f}], p {one['p']:.3g} "
            f"({one['p_holm']:.3g}), exact {one['p_exact']:.3g} ({one['p_exact_holm']:.3g}), "
            f"detectable {one['detectable']:.4f}, upper {one['upper']:+.4f}")


def _variant_cell(one: dict) -> str:
    return (f"{one['mean']:+.4f} [{one['ci_low']:+.4f}, {one['ci_high']:+.4f}], p {one['p']:.3g}, "
            f"exact p {one['p_exact']:.3g}")


def headline_markdown(reports: list[str | Path]) -> str:
    """The headline of the report folders, as Markdown: the scores and the lifts (one column per
    selection), the selection seeds apart, one verdict per question and the configurations on an
    edge of their range."""
    result = headline(reports)
    runs = result["reports"]
    column = {id(r): f"{SELECTIONS.get(r['selection'], r['selection'])}, trial `{r['tuned']}`"
              for r in runs}

    def label(key: str) -> str:  # an arm tuned under one selection may run at CMG's in another
        return " / ".join(dict.fromkeys(r["labels"][key] for r in runs if key in r["labels"]))

    table = [{"test AUROC [95% CI over seeds] / FPR95": label(key),
              **{column[id(r)]: (f"{s['auroc']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}] / "
                                 f"{s['fpr95']:.3f}" if (s := r["scores"].get(key)) else "not run")
                 for r in runs}}
             for key in dict.fromkeys(key for r in runs for key in r["scores"])]
    lift_rows, verdicts, not_run = [], [], []
    for question, versus in QUESTIONS:
        asked = [r for r in runs if versus in r["lifts"]]
        if not asked:  # its score was not replicated (an arm, or the first trial)
            not_run.append(question)
            continue
        lift_rows.append({"tuned CMG minus": label(versus),
                          **{column[id(r)]: (_lift_cell(r["lifts"][versus]) if r in asked
                                             else "not run") for r in runs}})
        verdicts.append(f"- **{question}** " + "; ".join(
            f"{SELECTIONS.get(r['selection'], r['selection'])}: {_verdict(r['lifts'][versus])}"
            for r in asked) + ".")
    if not_run:
        verdicts.append(f"- Not run in these replicates, so not answered: {' '.join(not_run)}")
    for name in dict.fromkeys(name for r in runs for name in r["variants"]):
        verdicts.append(f"- *{label(name)}* minus the arm as the sweep ran it (a variant: in no "
                        "question and no Holm family): " + "; ".join(
                            f"{SELECTIONS.get(r['selection'], r['selection'])}: "
                            + _variant_cell(r["variants"][name])
                            for r in runs if name in r["variants"]) + ".")
    first = runs[0]
    seeds = ", ".join(f"{SELECTIONS.get(r['selection'], r['selection'])}: "
                      f"{r['selection_seed']:.4f}" for r in runs)
    step = ALPHA / max(result["family"], 1)
    return "\n".join([
        f"Mean over {first['seeds']} new seeds x {first['partitions']} partitions, every (seed, "
        "partition) cell seeded on its own; the first trial is "
        + ", ".join(f"`{r['defaults']}`" for r in runs)
        + " (the reference's stage-2 knobs at the budget's epochs, distinct classes); the "
        "baselines are those of the tuned runs' classifiers; a control arm is \"tuned\" when its "
        "own sweep chose its configuration, else it ran at tuned CMG's knobs. Tuned CMG on the "
        f"seed it was selected on (the sweep's own run, in no test): {seeds}. Lifts (second "
        "table) are paired within (seed, partition) and read over the seed-level mean lifts: the "
        "mean [95% CI]; p, the t-test against 0 (Holm-adjusted over the "
        f"{result['family']} lifts); exact, the sign-flip p over every assignment of signs (Holm "
        f"alike); detectable, the lift found with {POWER:.0%} power at Holm's strictest step "
        f"({step:.3g}, two-sided t); upper, the largest lift the data leave open (the 90% CI's "
        "upper end, TOST at 0.05)." + _exact_note(result), "",
        pd.DataFrame(table).to_markdown(index=False, disable_numparse=True), "",
        pd.DataFrame(lift_rows).to_markdown(index=False, disable_numparse=True), "",
        *verdicts, *_edge_line(runs)])


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
