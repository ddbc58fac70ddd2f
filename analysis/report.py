"""`python -m analysis.report EXPERIMENT`: a sweep's results as files a researcher opens.

    python -m analysis.report experiments/same_dataset_mnist-CMG-energy-demo
    python -m analysis.report s3://bucket/sweeps/NAME --study-storage postgresql://... --out rep

writes into --out (default EXPERIMENT/report; for a URI, ./NAME-report):
  report.md        leaderboard, best configuration per partition against the baselines
                   (each searched knob of it within 5% of a bound flagged, with the --space
                   line that widens the range), importances and the figures, readable on GitHub
  summary.csv      one row per configuration (analysis.aggregate)
  trials.parquet   one row per (trial, partition) (analysis.load_trials)
  replicates.csv   one row per (seed replicate, partition), after tune.replicate
  history.png, params.png, partitions.png, importance.png
  roc.png, scores.png  ROC curves and IND/OOD score histograms of the best configuration against
                   the baselines, from its per-image scores files (when the trials wrote them)
and prints the `python -m cmg.run` command that reproduces one partition of the best configuration.
Configurations are ranked on validation; their test metrics are shown, never used to rank.
Works while the sweep runs (incomplete trials are listed, not ranked).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.edges import edges
from analysis.trial_files import load_scores, load_trial_record, reproduce_command
from analysis.figures import (history_figure, importance_figure, params_figure,
                              partitions_figure, roc_figure, save_png, scores_figure)
from analysis.replicates import load_replicates, replicate_markdown, replicate_table
from analysis.study import importance
from analysis.trials import (NotAnExperiment, aggregate, leaderboard, leave_one_set_out,
                             load_trials, ood_sets)
from cmg.errors import (OneLineParser, add_quiet_arg, atomic_write, command_parser,
                        ensure_writable_dir, exit_on_usage_error, fail)
from cmg.results import BASELINES, REPLICATES_FILE, Experiment, is_uri


def build_parser() -> OneLineParser:
    p = command_parser("python -m analysis.report", __doc__)
    p.add_argument("experiment", help="experiment folder (STORAGE/NAME) or a pyarrow URI")
    p.add_argument("--out", default=None,
                   help="output folder (default: EXPERIMENT/report; ./NAME-report for a URI)")
    p.add_argument("--study-storage", default=None,
                   help="the Optuna storage URL the sweep used (default: EXPERIMENT/optuna.journal)")
    p.add_argument("--by", default="val_auroc",
                   help="validation metric that ranks configurations (val_auroc, val_aupr_in, "
                        "val_aupr_out, val_fpr95)")
    p.add_argument("--top", type=int, default=10, help="rows of the leaderboard in report.md")
    add_quiet_arg(p)
    return p


def _fmt(mean: float, std: float | None = None, low: float | None = None,
         high: float | None = None, sign: bool = False) -> str:
    text = f"{mean:+.4f}" if sign else f"{mean:.4f}"
    if std is not None and pd.notna(std):
        text += f" ± {std:.4f}"
    if low is not None and pd.notna(low):
        text += f" [{low:.4f}, {high:.4f}]"
    return text


def _lift(row: pd.Series, baseline: str) -> str:
    """CMG's paired lift in test AUROC over `baseline`, with its 95% interval."""
    column = f"lift_{baseline}_test_auroc"
    return _fmt(row[f"{column}_mean"], None, row[f"{column}_ci_low"], row[f"{column}_ci_high"],
                sign=True)


def _params(row: pd.Series) -> dict:
    return {k.removeprefix("param_"): v for k, v in row.items()
            if k.startswith("param_") and pd.notna(v)}


def leaderboard_markdown(table: pd.DataFrame, by: str, top: int) -> str:
    board = leaderboard(table, by=by).head(top)
    if board.empty:
        return "_No configuration has finished all its partitions yet._"
    full = table.set_index("trial_id")
    lines = []
    for rank, row in enumerate(board.itertuples(index=False), start=1):
        t = full.loc[row.trial_id]
        lines.append({
            "rank": rank, "trial": row.trial_id,
            by: _fmt(t[f"{by}_mean"], t[f"{by}_std"]),
            "test AUROC (95% CI)": _fmt(t["test_auroc_mean"], None, t["test_auroc_ci_low"],
                                        t["test_auroc_ci_high"]),
            **{label: f"{t[f'{b}_test_auroc_mean']:.4f}" for b, label in BASELINES.items()},
            **{f"lift vs {label}": _lift(t, b) for b, label in BASELINES.items()},
            "parameters": ", ".join(f"{k}={_short(v)}" for k, v in _params(t).items()),
        })
    return pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def edge_lines(params: dict, space: dict | None) -> list[str]:
    """A Markdown item for each searched knob of a selected configuration on an edge of its
    range (analysis.edges), with the --space line that widens it; none: no line at all."""
    return [f"- **On an edge of the searched range:** {edge.line()}"
            for edge in edges(params, space)]


def best_section(df: pd.DataFrame, table: pd.DataFrame, by: str,
                 space: dict | None = None) -> str:
    """The best configuration against the baselines, per partition; `space` (the manifest's
    search space) flags its knobs on an edge of their range."""
    board = leaderboard(table, by=by)
    if board.empty:
        return "_No configuration has finished all its partitions yet._"
    best = table.set_index("trial_id").loc[board["trial_id"].iloc[0]]
    rows = df[df["trial_id"] == best.name].sort_values("partition")
    per_partition = rows[["partition", "val_auroc", "test_auroc",
                          *(f"{b}_test_auroc" for b in BASELINES),
                          "test_fpr95", "test_ind_acc"]].copy()
    per_partition["partition"] = per_partition["partition"].astype(int)
    means = per_partition.mean(numeric_only=True).to_frame().T.assign(partition="mean")
    per_partition = pd.concat([per_partition, means], ignore_index=True)
    return "\n".join([
        f"Trial `{best.name}`, selected on mean {by} "
        f"{_fmt(best[f'{by}_mean'], best[f'{by}_std'])} over its partitions.",
        "",
        f"- **Test AUROC {_fmt(best['test_auroc_mean'], best['test_auroc_std'])}** "
        + (f"(95% CI [{best['test_auroc_ci_low']:.4f}, {best['test_auroc_ci_high']:.4f}])"
           if pd.notna(best["test_auroc_ci_low"]) else "(one partition: no interval)"),
        "- Baselines from the same stage-1 classifiers: " + ", ".join(
            f"{label} {best[f'{b}_test_auroc_mean']:.4f}" for b, label in BASELINES.items()),
        "- Paired lift in test AUROC: " + ", ".join(
            f"over {label} {_lift(best, b)}" for b, label in BASELINES.items()),
        "- Parameters: " + ", ".join(f"`{k}={_short(v)}`" for k, v in _params(best).items()),
        *edge_lines(_params(best), space),
        "",
        per_partition.to_markdown(index=False, floatfmt=".4f"),
        *per_ood_set(df, best),
    ])


def per_ood_set(df: pd.DataFrame, best: pd.Series) -> list[str]:
    """different_dataset: the best configuration on each OOD set, beside the baselines."""
    names = ood_sets(df)
    if not names:
        return []
    columns = {"val AUROC": "val_{}_auroc", "test AUROC": "test_{}_auroc",
               "test FPR95": "test_{}_fpr95",
               **{f"{label} test AUROC": f"{b}_test_{{}}_auroc" for b, label in BASELINES.items()}}
    rows = [{"OOD set": name, **{label: best.get(f"{key.format(name)}_mean")
                                 for label, key in columns.items()}} for name in names]
    return ["", "Per OOD set (the means above are over these sets):", "",
            pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")]


def best_reproduce_command(experiment: str, df: pd.DataFrame, table: pd.DataFrame,
                           by: str) -> str:
    """The `python -m cmg.run` command that reruns the first partition of the best
    configuration (raises NotAnExperiment if its trial.json is missing)."""
    trial_id = leaderboard(table, by=by)["trial_id"].iloc[0]
    partition = int(df[df["trial_id"] == trial_id]["partition"].min())
    return reproduce_command(load_trial_record(experiment, trial_id), partition)


def best_scores(experiment: str, df: pd.DataFrame, table: pd.DataFrame,
                by: str) -> tuple[dict, str]:
    """The best configuration's figures from its scores files ({name: Figure}) and the report's
    section on them, with the command that reproduces its first partition."""
    board = leaderboard(table, by=by)
    if board.empty:
        return {}, "_No configuration has finished all its partitions yet._"
    trial_id = board["trial_id"].iloc[0]
    try:
        scores = load_scores(experiment, trial_id)
        command = best_reproduce_command(experiment, df, table, by)
    except NotAnExperiment as err:
        return {}, f"_Not available: {err}_"
    if scores.empty:
        return {}, f"_Trial `{trial_id}` wrote no per-image scores._"
    figures = {"roc": roc_figure(scores), "scores": scores_figure(scores)}
    return figures, "\n".join([
        f"Per-image scores of trial `{trial_id}` (`scores/partition-N.parquet` in its folder), "
        "test images: ROC curves of CMG and the baselines, and the score histograms of IND and "
        "OOD images for CMG and the best baseline.", "",
        "![ROC curves](roc.png)", "", "![score histograms](scores.png)", "",
        "Reproduce one partition of it (the same validation AUROC):", "",
        f"```\n{command}\n```"])


def replicates_note(replicates: pd.DataFrame, trials: pd.DataFrame) -> str:
    """tune.replicate's table (`load_replicates`; `trials`: the sweep's, for the selection
    seed's row), or how to make it."""
    table = replicate_table(replicates, selection=trials)
    return "\n".join([
        "The top configurations re-run with new seeds by `python -m tune.replicate`, beside their "
        "control arms on the same stage-1 models: every (seed, partition) cell seeded on its own "
        "(stage 1, stage 2 and the train/validation split). Quote the interval over seeds; the "
        "verdicts read the Holm-adjusted p-values.", "",
        replicate_markdown(table)])


VALIDATION_OOD = {
    "setting1": "validation OOD images are held-out *training* images of the same OOD classes "
                "that the test scores (10% of each class's train split; never a test image)",
    "setting2": "validation OOD images are a fixed, seeded 20% of each OOD data set; the test "
                "uses the other 80% of the very same sets",
}
BLIND = ("How to read the selection: it was blind to the unseen classes (`--select-on rotated`): "
         "validation OOD images are the validation IND images, each turned by 90, 180 or 270 "
         "degrees, so no image of the test's OOD classes was seen before the test. The epoch, the "
         "searched knobs, ASHA and this leaderboard were tuned on that proxy; the baselines were "
         "not tuned at all.")


def selection_note(df: pd.DataFrame, val_ood: str = "unseen") -> str:
    """What the selection saw (`val_ood`: the trials' `data.val_ood`): by default validation OOD
    comes from the test's OOD distribution."""
    if val_ood == "rotated":
        return BLIND
    setting = "setting2" if ood_sets(df) else "setting1"
    return (f"How to read the selection: {VALIDATION_OOD[setting]}. The epoch, the searched "
            "knobs, ASHA and this leaderboard were all tuned on real OOD data of the evaluated "
            "kind, while the baselines were not tuned at all, so the lift over them includes "
            "that advantage."
            + (" The leave-one-set-out table below shows how much of it survives an OOD set "
               "that the selection never saw." if setting == "setting2" else ""))


def _val_ood(experiment: str) -> str:
    """The sweep's `data.val_ood`, from its manifest ("unseen" before the option existed)."""
    manifest = Experiment.open(experiment).manifest or {}
    return manifest.get("run_config", {}).get("data", {}).get("val_ood", "unseen")


def leave_one_out_section(df: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """different_dataset: each OOD set held out of the selection in turn."""
    loso = leave_one_set_out(table, ood_sets(df))
    if loso.empty:
        return []
    return ["", "Leave one OOD set out: the configuration chosen on the mean validation AUROC "
            "of the other sets, its test AUROC on the held-out set, the configuration chosen "
            "on all sets, and the baselines' test AUROC on the held-out set:", "",
            loso.to_markdown(index=False, floatfmt=".4f")]


def others_section(df: pd.DataFrame, table: pd.DataFrame, by: str) -> str:
    """Trials left out of the leaderboard, so that nothing is silently dropped."""
    trials = df.groupby("trial_id", sort=False).agg(
        trial_number=("trial_number", "first"), status=("status", "first"),
        partitions=("partition", "count"), total=("partitions_total", "first"))
    means = table.set_index("trial_id")[f"{by}_mean"]
    trials[f"{by} so far"] = means.reindex(trials.index)
    others = trials[trials["partitions"] < trials.pop("total")].reset_index()
    if others.empty:
        return "_None: every trial finished all its partitions._"
    return others.to_markdown(index=False, floatfmt=".4f")


def write_report(experiment: str, out: Path, study_storage: str | None = None,
                 by: str = "val_auroc", top: int = 10,
                 df: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write every file of the report into `out`; returns {name: path}. Pass `df` (from
    `load_trials`) if you have it, so the trial files are read once."""
    df = load_trials(experiment) if df is None else df
    table = aggregate(df)
    try:
        importances = importance(experiment, study_storage, by=by, table=table)
        importance_note = ("fANOVA over complete configurations; the study gives the search "
                           "space." if not importances.empty else
                           "Needs two or more complete configurations in which a parameter varies.")
    except NotAnExperiment as err:
        importances = pd.DataFrame({"param": [], "importance": []})
        importance_note = f"Not available: {err}."
    # everything is computed before the first file is written: an error leaves no partial report
    figures = {"history": history_figure(table, by), "params": params_figure(table, by),
               "partitions": partitions_figure(df, table, by=by),
               "importance": importance_figure(importances)}
    score_figures, scores_text = best_scores(experiment, df, table, by)
    figures.update(score_figures)
    replicates = load_replicates(experiment)
    counts = df.groupby("trial_id")["status"].first().value_counts()
    exp = Experiment.open(experiment)
    name, space = exp.name, (exp.manifest or {}).get("space")
    text = "\n".join([
        f"# Sweep report: {name}",
        "",
        f"Experiment `{experiment}`: {counts.sum()} trials, {counts.get('complete', 0)} complete "
        f"(all {int(df['partitions_total'].max())} partitions), "
        f"{counts.get('incomplete', 0)} pruned (stopped early by ASHA) or still "
        f"running, {counts.get('error', 0)} failed. Configurations are ranked on the mean "
        f"{by} over the partitions (validation data; in different_dataset the mean over the OOD "
        "sets); the test metrics are those of the "
        "ranked configurations and were never used to choose. Baselines ("
        f"{', '.join(BASELINES.values())}) "
        "come from the same stage-1 classifier as each CMG result; a lift is the mean over "
        "partitions of CMG minus the baseline, with a 95% t-interval.",
        "",
        selection_note(df, _val_ood(experiment)), "",
        "## Best configuration", "", best_section(df, table, by, space),
        *leave_one_out_section(df, table), "",
        f"## Leaderboard (complete configurations, top {top})", "",
        leaderboard_markdown(table, by, top), "",
        "![top configurations per partition](partitions.png)", "",
        "## Scores of the best configuration", "", scores_text, "",
        "## Optimisation history", "", "![history](history.png)", "",
        "## Parameters", "", "![parameters against the objective](params.png)", "",
        "## Parameter importances", "", importance_note, "",
        importances.to_markdown(index=False, floatfmt=".3f") if not importances.empty else "",
        "", "![importances](importance.png)", "",
        "## Seed replicates", "", replicates_note(replicates, df), "",
        "## Trials not on the leaderboard", "", others_section(df, table, by), "",
        "Files: `summary.csv` (one row per configuration: mean, std and 95% CI of every metric), "
        "`trials.parquet` (one row per trial and partition)"
        + (f", `{REPLICATES_FILE}` (one row per seed replicate and partition; "
           "`python -m analysis.headline` turns it into the headline table)."
           if not replicates.empty else "."), "",
    ])
    files: dict[str, Path] = {}
    for figure_name, fig in figures.items():
        files[figure_name] = save_png(fig, out / f"{figure_name}.png")
    with atomic_write(out / "summary.csv", "w") as handle:
        table.to_csv(handle, index=False)
    files["summary"] = out / "summary.csv"
    with atomic_write(out / "trials.parquet") as handle:
        df.to_parquet(handle, index=False)
    files["trials"] = out / "trials.parquet"
    if not replicates.empty:  # the run folder by name: no local paths in a published report
        with atomic_write(out / REPLICATES_FILE, "w") as handle:
            replicates.assign(run=replicates["run"].map(lambda r: r.rstrip("/").rsplit("/", 1)[-1])
                              ).to_csv(handle, index=False)
        files["replicates"] = out / REPLICATES_FILE
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(text)
    files["report"] = out / "report.md"
    return files


@exit_on_usage_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.by.startswith("val_"):
        fail(f"--by {args.by}: rank on a validation metric (val_auroc, val_fpr95, ...), never test")
    try:
        root = Experiment.open(args.experiment).root
        df = load_trials(args.experiment)  # fails before any folder is created
        out = Path(args.out) if args.out else (
            Path(f"{root.rsplit('/', 1)[-1]}-report") if is_uri(args.experiment)
            else Path(root) / "report")
        ensure_writable_dir(out)
        files = write_report(args.experiment, out, args.study_storage, args.by, args.top, df)
    except NotAnExperiment as err:
        fail(str(err))
    if not args.quiet:
        table = aggregate(df)
        board = leaderboard(table, by=args.by)
        print(board.head(5)[["trial_id", f"{args.by}_mean", "test_auroc_mean",
                             *(f"{b}_test_auroc_mean" for b in BASELINES)]].to_string(
                                 index=False, float_format="%.4f"))
        if not board.empty:  # the best configuration's knobs on an edge of the searched range
            best = table.set_index("trial_id").loc[board["trial_id"].iloc[0]]
            space = (Experiment.open(args.experiment).manifest or {}).get("space")
            for edge in edges(_params(best), space):
                print(f"edge: {edge.line()}")
        if "roc" in files:
            print("reproduce partition 1 of the best configuration: "
                  + best_reproduce_command(args.experiment, df, table, args.by))
    print(f"report: {files['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
