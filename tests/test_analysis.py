"""analysis/ over the real smoke sweep shared with the sweep tests."""

import json
import math
import re
import shutil
import statistics
import subprocess
import sys

import pandas as pd
import pytest
from scipy import stats

from analysis import NotAnExperiment, aggregate, importance, leaderboard, load_trials
from analysis.trials import trial_rows
from cmg.results import ROW_INFO, Experiment
from conftest import ROOT, run_main

REPORT_FILES = ["report.md", "summary.csv", "trials.parquet", "history.png", "params.png",
                "partitions.png", "importance.png", "roc.png", "scores.png"]


def test_load_trials_gives_one_row_per_trial_and_partition(smoke_sweep):
    df = load_trials(smoke_sweep["experiment"])
    assert df["trial_id"].nunique() == 5
    assert set(df["status"]) <= {"complete", "incomplete", "error"} and "error" in set(df["status"])
    for trial_id, group in df.dropna(subset=["partition"]).groupby("trial_id"):
        assert list(group["partition"]) == list(range(1, len(group) + 1))
    assert {"param_sigma", "val_auroc", "msp_test_fpr95", "energy_val_aupr_in"} <= set(df)
    # what else each partition recorded reaches the table (and trials.parquet): its seconds,
    # selected epoch and stage-1 key, as in the trial's own rows
    done = df.dropna(subset=["partition"])
    assert set(ROW_INFO) <= set(df) and (done["stage2_s"] > 0).all()
    row = done.iloc[0]
    folder = Experiment.open(smoke_sweep["experiment"]).trial(row["trial_id"])
    first = trial_rows(folder.path)[0]
    assert (row["stage2_s"], row["selected_epoch"], row["stage1_key"]) == (
        first["stage2_s"], first["selected_epoch"], first["stage1_key"])


def test_aggregate_matches_numbers_computed_by_hand_from_the_trial_files(smoke_sweep):
    table = aggregate(load_trials(smoke_sweep["experiment"]))
    folder = next(p for p in smoke_sweep["experiment"].glob("trial-*")
                  if len((p / "result.json").read_text().splitlines()) == 5)
    rows = trial_rows(folder)
    row = table[table["trial_id"] == rows[0]["trial_id"]].iloc[0]
    values = [r["test_auroc"] for r in rows]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    assert row["n_partitions"] == 5
    assert row["test_auroc_mean"] == pytest.approx(mean)
    assert row["test_auroc_std"] == pytest.approx(sd)
    assert row["test_auroc_ci_high"] == pytest.approx(mean + stats.t.ppf(0.975, 4) * sd / 5 ** 0.5)
    lift = statistics.mean(r["val_auroc"] - r["msp_val_auroc"] for r in rows)
    assert row["lift_msp_val_auroc_mean"] == pytest.approx(lift)
    # the sweep's own running mean and sample sd agree
    assert row["val_auroc_mean"] == pytest.approx(rows[-1]["val_auroc_mean"])
    assert row["test_auroc_std"] == pytest.approx(rows[-1]["test_auroc_std"])


def test_leaderboard_keeps_incomplete_trials_out(smoke_sweep):
    table = aggregate(load_trials(smoke_sweep["experiment"]))
    board = leaderboard(table)
    incomplete = set(table.loc[table["n_partitions"] < 5, "trial_id"])
    assert incomplete and not incomplete & set(board["trial_id"])
    assert list(board["val_auroc_mean"]) == sorted(board["val_auroc_mean"], reverse=True)
    assert not math.isnan(board["test_auroc_mean"].iloc[0])


def test_missing_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(NotAnExperiment, match="no sweep trials"):
        load_trials(tmp_path)


ANALYSIS = ["analysis", "analysis.trial_files", "analysis.figures", "analysis.replicates",
            "analysis.report", "analysis.study", "analysis.trials", "analysis.edges",
            "analysis.headline"]
CONTRACT = ["cmg.results", "cmg.errors", "cmg.config"]  # what analysis may use of the project


def loaded_modules(*modules: str) -> set[str]:
    """The top-level and project modules a fresh interpreter holds after importing `modules`."""
    code = (f"import sys, {', '.join(modules)}; print(*sorted(m for m in sys.modules "
            "if '.' not in m or m.split('.')[0] in ('cmg', 'tune', 'analysis')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_analysis_uses_only_the_contract_modules_of_the_project():
    loaded = loaded_modules(*ANALYSIS)
    assert "torch" not in loaded and "ray" not in loaded
    project = {m for m in loaded if m.split(".")[0] in ("cmg", "tune")}
    assert project <= {"cmg", *CONTRACT}, project


def test_the_contract_modules_import_only_the_standard_library():
    loaded = loaded_modules(*CONTRACT)
    outside = {m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and m not in ("cmg", *CONTRACT) and not m.startswith("_")}
    assert not outside, outside


def test_the_method_library_imports_neither_ray_nor_optuna_nor_the_upper_layers():
    """`cmg/` runs on the GPU machines, which have neither Ray nor Optuna: every module of it."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "cmg").rglob("*.py") if p.name != "__init__.py")
    assert len(modules) > 20 and "cmg.stage2" in modules
    loaded = loaded_modules(*modules)
    assert "torch" in loaded  # the check sees third-party imports
    assert not loaded & {"ray", "optuna", "tune", "analysis"}, loaded & {"ray", "optuna"}


def test_the_lease_service_module_loads_ray_without_the_training_code():
    """The lease service's actor process imports tune.leases alone: a few hundred MB and seconds
    of start-up less than with torch and scikit-learn, on every cluster's head node."""
    loaded = loaded_modules("tune.leases")
    assert "ray" in loaded  # the check sees third-party imports
    assert not loaded & {"torch", "sklearn", "pandas", "optuna"}, loaded
    assert {m for m in loaded if m.split(".")[0] in ("cmg", "tune")} <= {
        "cmg", "cmg.results", "tune", "tune.leases"}


def test_trial_folders_are_named_trial_number_id_and_read_by_the_contract(smoke_sweep):
    experiment = smoke_sweep["experiment"]
    names = sorted(p.name for p in experiment.iterdir() if p.is_dir() and p.name != "report")
    trials = [n for n in names if n.startswith("trial-")]
    assert len(trials) == 5 and all(re.fullmatch(r"trial-\d+-[0-9a-f]+", n) for n in trials)
    read = Experiment.open(experiment).trials()
    assert [f.name for f in read] == sorted(trials, key=lambda n: int(n.split("-")[1]))
    for folder in read:  # the folder's id is the one its rows carry
        assert all(r["trial_id"] == folder.trial_id for r in trial_rows(folder.path))


def test_load_trials_reads_a_pyarrow_uri_like_a_folder(smoke_sweep):
    local = load_trials(smoke_sweep["experiment"])
    remote = load_trials(smoke_sweep["experiment"].as_uri())  # file:///... through pyarrow.fs
    pd.testing.assert_frame_equal(local, remote)


def test_importance_ranks_the_searched_parameters_and_leaves_the_study_alone(second_sweep):
    journal = second_sweep["experiment"] / "optuna.journal"
    before = journal.read_bytes()
    scores = importance(second_sweep["experiment"])
    # latent_dim, lr, epochs and ood_per_batch are fixed by the space file; mask_prob only exists
    # for mask mixing
    searched = {"mixing", "mask_prob", "num_mixed", "distinct", "sigma", "energy_weight",
                "m_in_percentile", "m_out_percentile"}
    assert {"sigma", "energy_weight", "m_in_percentile"} <= set(scores["param"]) <= searched
    assert scores["importance"].sum() == pytest.approx(1.0)
    assert list(scores["importance"]) == sorted(scores["importance"], reverse=True)
    assert journal.read_bytes() == before


def test_importance_needs_two_complete_configurations(smoke_sweep, tmp_path):
    table = aggregate(load_trials(smoke_sweep["experiment"]))
    only = table.loc[table["n_partitions"] == 5, "trial_id"].iloc[0]
    experiment = tmp_path / "smoke"  # a copy that keeps a single complete trial
    experiment.mkdir()
    shutil.copy(smoke_sweep["experiment"] / "optuna.journal", experiment)
    for folder in smoke_sweep["experiment"].glob(f"trial-*-{only}"):
        shutil.copytree(folder, experiment / folder.name)
    assert importance(experiment).empty


def test_report_command_writes_every_file(smoke_sweep, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(smoke_sweep["experiment"]),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    for name in REPORT_FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = load_trials(smoke_sweep["experiment"])
    table = aggregate(df)
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == len(df) and "stage2_s" in trials
    summary = pd.read_csv(out / "summary.csv", dtype={"trial_id": str})
    assert list(summary["trial_id"]) == list(table["trial_id"])
    report = (out / "report.md").read_text()
    best = leaderboard(table)["trial_id"].iloc[0]
    assert f"Trial `{best}`" in report and "![history](history.png)" in report
    for trial_id in table.loc[table["n_partitions"] < 5, "trial_id"]:  # listed, not ranked
        assert report.split("## Trials not on the leaderboard")[1].count(trial_id) == 1


def test_fpr95_ranks_lowest_first_in_the_leaderboard_and_the_report(second_sweep, tmp_path):
    table = aggregate(load_trials(second_sweep["experiment"]))
    ids = list(table["trial_id"])
    assert len(ids) == 2
    for fprs in ([0.2, 0.1], [0.1, 0.2]):  # lower is better, whichever trial has it
        ranked = leaderboard(table.assign(val_fpr95_mean=fprs), by="val_fpr95")
        assert list(ranked["trial_id"]) == [ids[fprs.index(0.1)], ids[fprs.index(0.2)]]
    assert list(leaderboard(table.assign(val_auroc_mean=[0.7, 0.9]))["trial_id"]) == ids[::-1]
    proc = run_main("analysis.report", str(second_sweep["experiment"]), "--by", "val_fpr95",
                    "--out", str(tmp_path / "report"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    best = table.loc[table["val_fpr95_mean"].idxmin()]
    report = (tmp_path / "report" / "report.md").read_text()
    chosen = report.split("Trial `")[1].split("`")[0]
    assert chosen in ids and "selected on mean val_fpr95" in report
    assert table.set_index("trial_id").loc[chosen, "val_fpr95_mean"] == best["val_fpr95_mean"]


def test_the_report_flags_a_best_configuration_on_an_edge_and_is_silent_inside(smoke_sweep,
                                                                              tmp_path):
    """The best configuration's searched knobs against the space its manifest records: with
    every range centred on the best's values, report.md and the command say nothing; with
    sigma's range starting at the best's sigma (on a linear scale), both name it and the --space
    line that widens it."""
    table = aggregate(load_trials(smoke_sweep["experiment"]))
    best = table.set_index("trial_id").loc[leaderboard(table)["trial_id"].iloc[0]]
    params = {k.removeprefix("param_"): v for k, v in best.items()
              if k.startswith("param_") and pd.notna(v)}
    experiment = tmp_path / "smoke"
    shutil.copytree(smoke_sweep["experiment"], experiment, ignore=shutil.ignore_patterns("report"))
    manifest = json.loads((experiment / "manifest.json").read_text())
    space = manifest["space"]
    searched = [n for n, p in space.items() if n in params and p["kind"] in ("float", "int")
                and p["fixed"] is None]
    assert "sigma" in searched  # the smoke sweep searches sigma in [2, 4]
    for name in searched:
        kind, log = (int if space[name]["kind"] == "int" else float), space[name]["log"]
        value = kind(params[name])
        space[name].update(low=value / 2 if log else value - 1,
                           high=value * 2 if log else value + 1)
    reports = {}
    for case in ("inside", "edge"):
        if case == "edge":
            space["sigma"].update(low=params["sigma"], high=params["sigma"] + 2, log=False)
        (experiment / "manifest.json").write_text(json.dumps(manifest))
        proc = run_main("analysis.report", str(experiment), "--out", str(tmp_path / case))
        assert proc.returncode == 0, proc.stderr
        reports[case] = (proc.stdout, (tmp_path / case / "report.md").read_text())
    for text in reports["inside"]:
        assert "On an edge" not in text and "edge: " not in text and "--space" not in text
    stdout, report = reports["edge"]
    sigma = f"{params['sigma']:.3g}"
    low, high = float(params["sigma"]), float(params["sigma"]) + 2  # widened by half below
    line = f"`sigma: {{low: {low - (high - low) / 2!r}, high: {high!r}}}`"
    assert (f"- **On an edge of the searched range:** `sigma` {sigma} sits at the low end of "
            f"[{sigma}, ") in report and line in report
    assert f"edge: `sigma` {sigma} sits at the low end" in stdout and line in stdout


@pytest.mark.parametrize("target", ["missing", "empty"])
def test_report_on_a_non_experiment_is_one_line_and_writes_nothing(tmp_path, target):
    path = tmp_path / "exp"
    if target == "empty":
        path.mkdir()
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no sweep trials" in proc.stderr
    assert not (path / "report").exists()


def test_notebook_runs_top_to_bottom_with_a_real_kernel(smoke_sweep):
    import nbformat
    from nbclient import NotebookClient

    notebook = ROOT / "analysis" / "notebooks" / "sweep_report.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = f"experiment = {str(smoke_sweep['experiment'])!r}\n" \
                        "study_storage = None\nby = 'val_auroc'"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 6
