"""Seed replicates: the table's statistics by hand, and tune.replicate on a real local Ray over
the shared smoke sweep (Ctrl-C stops it with exit 130, the same command finishes it, a third
call adds nothing)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from analysis.replicates import (SELECTION_ROW, holm, load_replicates, replicate_markdown,
                                 replicate_table)
from analysis.trials import load_trials, trial_rows
from cmg.config import cell_seed
from cmg.results import ALL_METRICS, ARMS, BASELINES, HEAD_BASELINES, REPLICATES_FILE, Experiment
from tests.conftest import ROOT, run_main


def _rows() -> pd.DataFrame:
    """2 seeds x 3 partitions of one configuration, made-up AUROCs."""
    cmg = {(1, 1): 0.90, (1, 2): 0.80, (1, 3): 0.70, (2, 1): 0.92, (2, 2): 0.86, (2, 3): 0.74}
    rows = [{"source_trial": "t1", "seed": s, "partition": p, "test_auroc": v,
             **{f"{b}_test_auroc": v - 0.1 * (s == 1) - 0.02 * k for k, b in enumerate(BASELINES)}}
            for (s, p), v in cmg.items()]
    return pd.DataFrame(rows)


def test_replicate_table_statistics_by_hand():
    table = replicate_table(_rows()).set_index("score")
    cmg = table.loc["CMG"]
    seed_means = [statistics.fmean([0.90, 0.80, 0.70]), statistics.fmean([0.92, 0.86, 0.74])]
    assert (cmg["seeds"], cmg["partitions"]) == (2, 3)
    assert cmg["mean"] == pytest.approx(statistics.fmean([0.90, 0.80, 0.70, 0.92, 0.86, 0.74]))
    assert cmg["seed_sd"] == pytest.approx(statistics.stdev(seed_means))
    half = stats.t.ppf(0.975, 1) * statistics.stdev(seed_means) / 2 ** 0.5
    assert cmg["seed_ci_low"] == pytest.approx(statistics.fmean(seed_means) - half)
    # lifts are paired within (seed, partition): max-softmax is 0.1 below on seed 1 only
    lift = table.loc["lift vs max-softmax"]
    assert lift["mean"] == pytest.approx(0.05)
    assert lift["seed_sd"] == pytest.approx(statistics.stdev([0.1, 0.0]))
    assert table.loc["lift vs max-logit", "mean"] == pytest.approx(0.05 + 0.04)
    assert "partition_ci_low" not in table  # partitions share IND classes: no interval over them


def test_holm_adjusts_step_down_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan"), 0.6]) == pytest.approx([1.0, float("nan"), 1.0], nan_ok=True)


def test_control_arms_are_paired_with_cmg_and_the_lifts_holm_adjusted():
    """3 seeds x 2 partitions: head re-training alone (arm "none") 0.01 below CMG on every cell
    but one, the unmixed arm equal to CMG, up to noise. The lifts' p-values are t-tests of the
    seed-level means; Holm over the whole family of lifts."""
    noise = {1: 0.002, 2: -0.001, 3: 0.0005}
    rows = []
    for s in (1, 2, 3):
        for p in (1, 2):
            cmg = 0.90 + 0.01 * p + noise[s]
            base = {f"{b}_test_auroc": cmg - 0.05 - noise[s] for b in BASELINES}
            rows += [{"source_trial": "t1", "seed": s, "partition": p, "arm": "mixed",
                      "test_auroc": cmg, **base},
                     {"source_trial": "t1", "seed": s, "partition": p, "arm": "none",
                      "test_auroc": cmg - 0.01 + 0.004 * (s == 2 and p == 1), **base,
                      **{f"{h}_test_auroc": cmg - 0.02 - noise[s] / 2 for h in HEAD_BASELINES}},
                     {"source_trial": "t1", "seed": s, "partition": p, "arm": "single",
                      "test_auroc": cmg + noise[4 - s], **base}]
    table = replicate_table(pd.DataFrame(rows)).set_index("score")
    none, single = ARMS["none"], ARMS["single"]
    assert list(table.index[:7]) == ["CMG", *BASELINES.values(), single, none,
                                     "max-softmax, re-trained head"][:7]
    lift = table.loc[f"lift vs {none}"]
    per_seed = [0.01, 0.01 - 0.004 / 2, 0.01]
    assert lift["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert lift["p"] == pytest.approx(stats.ttest_1samp(per_seed, 0).pvalue)
    lifts = table[table.index.str.startswith("lift")]
    assert list(lifts["p_holm"]) == pytest.approx(holm(list(lifts["p"])))
    assert table.loc[f"lift vs {single}", "verdict"].startswith("CMG does not beat")
    assert table.loc["lift vs max-logit", "verdict"] == "CMG beats max-logit"
    assert table.loc["lift vs max-logit, re-trained head", "mean"] == pytest.approx(
        0.02 + statistics.fmean(noise.values()) / 2)
    # the seed the sweep selected on: a row apart, in no lift and no test
    sweep = pd.DataFrame({"trial_id": ["t1", "t1", "t0"], "test_auroc": [0.95, 0.85, 0.1]})
    with_selection = replicate_table(pd.DataFrame(rows), selection=sweep).set_index("score")
    assert with_selection.loc[SELECTION_ROW, "mean"] == pytest.approx(0.90)
    assert with_selection.loc[SELECTION_ROW, ["seeds", "partitions"]].tolist() == [1, 2]
    assert with_selection["p_holm"].dropna().tolist() == pytest.approx(
        table["p_holm"].dropna().tolist())
    assert "3 seeds x 2 partitions" in replicate_markdown(with_selection.reset_index())


def _replicate(experiment, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tune.replicate", str(experiment), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)


def _interrupt_once_training(experiment, store: Path) -> tuple[int, str]:
    """tune.replicate, sent Ctrl-C (SIGINT to its process group) once its stage-1 tasks train
    (a new owner record in the STORE): (its exit code, its stderr)."""
    before = set(store.glob("*/partial/owner.json"))
    proc = subprocess.Popen([sys.executable, "-m", "tune.replicate", str(experiment), "--top",
                             "1", "--seeds", "1", "--arms", "none", "--eval-limit", "64",
                             "--quiet"], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not set(store.glob("*/partial/owner.json")) - before:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "tune.replicate started no stage-1 training"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_replicate_reruns_the_best_configuration_with_new_seeds(smoke_sweep, tmp_path):
    # a copy of the shared experiment: its replicates must not change what other tests read
    # (the stage-1 store stays the shared one, which trains the new seeds' models once)
    experiment = Path(shutil.copytree(smoke_sweep["experiment"], tmp_path / "smoke"))
    summary = json.loads((experiment / "summary.json").read_text())
    code, err = _interrupt_once_training(experiment, smoke_sweep["storage"] / "stage1")
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted with 0 of 2 runs added; continue with: python -m "
                        r"tune\.replicate \S+ --top 1 --seeds 1 --arms none --eval-limit 64 "
                        r"--quiet", last), err
    assert "Traceback" not in err
    proc = _replicate(experiment, "--top", "1", "--seeds", "1", "--arms", "none",
                      "--eval-limit", "64", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs added" in proc.stdout
    assert "Configuration for experiment" not in proc.stdout + proc.stderr  # no Ray box
    df = load_replicates(experiment)
    best = summary["best"]["trial_id"]  # the sweep's best on validation
    assert set(df["source_trial"]) == {best}
    assert sorted(set(df["seed"])) == [4]  # the sweep's seed was 3
    assert sorted(df.groupby("arm")["partition"].apply(sorted).items()) == [
        ("mixed", [1, 2, 3, 4, 5]), ("none", [1, 2, 3, 4, 5])]
    assert all(df[f"param_{k}"].eq(v).all() for k, v in summary["best"]["params"].items())
    # a new seed -> new stage-1 models: a classifier and the best's CVAE per partition, each
    # seeded and split by its own cell, trained once by the replicate's prewarm tasks and
    # shared by both arms
    meta = [json.loads(p.read_text())
            for p in (smoke_sweep["storage"] / "stage1").glob("*/meta.json")]
    cells = {cell_seed(4, p): p for p in range(1, 6)}
    seeded = [m for m in meta if m["config"][m["kind"]]["seed"] in cells]
    assert sorted((m["kind"], m["partition"]) for m in seeded) == [
        (kind, p) for kind in ("classifier", "cvae") for p in range(1, 6)]
    for m in seeded:
        assert cells[m["config"][m["kind"]]["seed"]] == m["partition"]
        assert m["config"]["data"]["split_seed"] == m["config"][m["kind"]]["seed"]
        assert m["trained_by"].startswith("smoke/prewarm-")
    keys = {json.loads((f / "params.json").read_text())["arm"]: {r["stage1_key"] for r in
                                                                 trial_rows(f)}
            for f in (experiment / "replicate").glob("*/replicate-*")}
    assert keys["mixed"] == keys["none"] and len(keys["mixed"]) == 5  # the same models
    # a different seed gives a different test AUROC than the sweep's own run on some partition
    swept = load_trials(experiment).query("trial_id == @best").set_index("partition")
    assert any(swept.loc[p, "test_auroc"] != a for p, a in zip(df["partition"], df["test_auroc"]))
    assert "CMG" in proc.stdout and "max-logit" in proc.stdout and "CI over seeds" in proc.stdout
    assert f"lift vs {ARMS['none']}" in proc.stdout and "p (Holm)" in proc.stdout
    assert SELECTION_ROW in proc.stdout

    folders = sorted((experiment / "replicate").glob("*/replicate-*"))
    again = _replicate(experiment, "--top", "1", "--seeds", "1", "--arms", "none",
                       "--eval-limit", "64", "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 runs added" in again.stdout
    assert sorted((experiment / "replicate").glob("*/replicate-*")) == folders

    report = run_main("analysis.report", str(experiment), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(tmp_path / "report" / REPLICATES_FILE, dtype={"source_trial": str})
    assert len(table) == 10 and set(table["source_trial"]) == {best}


def _fake_run(experiment, run: str, trial: str, seed: int, aurocs: list[float],
              total: int = 2) -> None:
    folder = experiment / "replicate" / run / f"replicate_trainable_{trial}_0_seed={seed}_2026"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"source_trial": "t1", "seed": seed}))
    (folder / "result.json").write_text("\n".join(json.dumps(
        {"trial_id": f"{trial}_00000", "partitions_total": total, "partition": p + 1,
         "test_auroc": a}) for p, a in enumerate(aurocs)))


def test_load_replicates_keeps_the_latest_complete_run_of_each_seed(tmp_path):
    _fake_run(tmp_path, "run-20260101-000000", "aa", 1, [0.5, 0.6])
    _fake_run(tmp_path, "run-20260102-000000", "bb", 1, [0.7, 0.8])  # seed 1 again: this one
    _fake_run(tmp_path, "run-20260102-000000", "cc", 2, [0.9])  # incomplete: left out
    df = load_replicates(tmp_path)
    assert list(df["test_auroc"]) == [0.7, 0.8] and set(df["seed"]) == {1}
    assert load_replicates(tmp_path / "nothing").empty


def _fake_trial(experiment, trial: str, number: int, val_aurocs: list[float], params: dict,
                total: int = 2) -> None:
    """A sweep trial folder as Tune wrote it before folders were named trial-N-ID (still read):
    params.json and one result line per partition."""
    folder = experiment / f"stage2_trainable_{trial}_{number}_mode=CMG-energy_2026"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "result.json").write_text("\n".join(json.dumps(
        {"trial_id": trial, "partitions_total": total, "partition": p + 1,
         **{m: a for m in ALL_METRICS}}) for p, a in enumerate(val_aurocs)))


def test_with_defaults_adds_the_first_configuration_even_when_early_stopping_cut_it(tmp_path):
    from tune.replicate import chosen_runs, points_to_add

    def missing_points(exp, top, seeds, with_defaults=False):
        chosen, runs = chosen_runs(exp, top, with_defaults)
        return [folder.trial_id for folder in chosen], points_to_add(exp, runs, seeds)

    defaults = {"mode": "CMG-energy", "sigma": 3.0, "mask_prob": 0.5}
    _fake_trial(tmp_path, "f1f1", 1, [0.5], defaults)  # stopped after one partition
    _fake_trial(tmp_path, "a0a0", 2, [0.9, 0.8], {**defaults, "sigma": 1.0})
    _fake_trial(tmp_path, "b0b0", 3, [0.7, 0.6], {**defaults, "sigma": 6.0})
    chosen, points = missing_points(Experiment.open(tmp_path), 1, [1, 2], with_defaults=True)
    assert chosen == ["a0a0", "f1f1"]
    assert [(p["source_trial"], p["seed"]) for p in points] == [
        ("a0a0", 1), ("f1f1", 1), ("a0a0", 2), ("f1f1", 2)]
    assert points[1] == {"source_trial": "f1f1", "seed": 1, "arm": "mixed", **defaults}
    assert missing_points(Experiment.open(tmp_path), 2, [1])[0] == ["a0a0", "b0b0"]
    # the defaults among the top: replicated once
    _fake_trial(tmp_path / "b", "f1f1", 1, [0.95, 0.9], defaults)
    _fake_trial(tmp_path / "b", "a0a0", 2, [0.9, 0.8], {**defaults, "sigma": 1.0})
    assert missing_points(Experiment.open(tmp_path / "b"), 2, [1],
                          with_defaults=True)[0] == ["f1f1", "a0a0"]
