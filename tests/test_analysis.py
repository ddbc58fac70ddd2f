"""analysis/ over the real smoke sweep shared with the sweep tests."""

import json
import math
import statistics
import subprocess
import sys

import pytest
from scipy import stats

from analysis import NotAnExperiment, aggregate, leaderboard, load_trials
from conftest import ROOT


def test_load_trials_gives_one_row_per_trial_and_partition(smoke_sweep):
    df = load_trials(smoke_sweep["experiment"])
    assert df["trial_id"].nunique() == 5
    assert set(df["status"]) <= {"complete", "stopped", "error"} and "error" in set(df["status"])
    for trial_id, group in df.dropna(subset=["partition"]).groupby("trial_id"):
        assert list(group["partition"]) == list(range(1, len(group) + 1))
    assert {"param_sigma", "val_auroc", "msp_test_fpr95", "energy_val_aupr_in"} <= set(df)


def test_aggregate_matches_numbers_computed_by_hand_from_the_trial_files(smoke_sweep):
    table = aggregate(load_trials(smoke_sweep["experiment"]))
    folder = next(p for p in smoke_sweep["experiment"].glob("stage2_trainable_*")
                  if len((p / "result.json").read_text().splitlines()) == 5)
    rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
    row = table[table["trial_id"] == rows[0]["trial_id"]].iloc[0]
    values = [r["test_auroc"] for r in rows]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    assert row["n_partitions"] == 5
    assert row["test_auroc_mean"] == pytest.approx(mean)
    assert row["test_auroc_std"] == pytest.approx(sd)
    assert row["test_auroc_ci_high"] == pytest.approx(mean + stats.t.ppf(0.975, 4) * sd / 5 ** 0.5)
    lift = statistics.mean(r["val_auroc"] - r["msp_val_auroc"] for r in rows)
    assert row["lift_msp_val_auroc_mean"] == pytest.approx(lift)
    # the sweep's own running mean agrees
    assert row["val_auroc_mean"] == pytest.approx(rows[-1]["val_auroc_mean"])


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


def test_analysis_imports_neither_torch_nor_ray():
    code = "import analysis, sys; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
