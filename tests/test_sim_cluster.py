"""The simulated-cluster benchmark runs end to end on a short smoke: the real driver on Ray's
multi-node `Cluster` (2 logical GPU nodes) with the stand-in training, and the searcher-only
TPE scenario. What is checked is what the figures are computed from, never the timings."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from bench.sim import tpe
from conftest import ROOT

TRIALS = 6


@pytest.mark.slow  # about 36 s: a 3-process Ray cluster and a sweep in a subprocess
def test_scale_runs_every_stand_in_trial_through_the_real_driver_on_two_nodes(tmp_path):
    # a subprocess, as `python -m tune.sweep` runs: Tune pickles the driver's callbacks, which
    # hold the console stream that pytest's capture replaces with an unpicklable one
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "bench/sim_cluster.py", "scale", "--nodes", "2",
                           "--trials", str(TRIALS), "--part-s", "0.3", "--sample-every", "3",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.stdout.strip().splitlines()[-1].startswith(("scale PASS", "scale FAIL"))
    assert result["slots"] == 4  # 2 nodes x (2 CPUs, 1 GPU) at 1 CPU and 0.5 GPU per trial
    assert result["trials_complete"] == result["trial_runs"] == TRIALS  # none failed or retried
    assert result["processes"] >= 2  # more than one slot ran trials
    assert result["slot_gap_p50_s"] is not None  # a slot's process ran one trial after another
    assert 0 < result["efficiency"] and 0 <= result["report_block_p50_s"]
    assert [s["trials"] for s in result["block_samples"]] == [3, 3]
    assert result["snapshot_bytes"] > 0


@pytest.mark.slow  # about two minutes: 2 nodes, 8 stand-in trials in a subprocess
def test_placement_with_two_trials_per_gpu_keeps_every_gpu_busy(tmp_path):
    """The fractional run through the real driver: --max-concurrent 2 x GPUs makes the sweep's
    default share 0.5; while all 8 trials run, every GPU has two."""
    out = tmp_path / "placement.json"
    proc = subprocess.run([sys.executable, "bench/sim_cluster.py", "placement", "--nodes", "2",
                           "--gpus-per-node", "2", "--trials-per-gpu", "2", "--part-s", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.stdout.strip().splitlines()[-1].startswith("placement PASS: busy_fraction 1.0000")
    assert result["gpus_per_trial"] == 0.5 and result["default_share"]
    assert result["trials_complete"] == result["trials"] == 8
    assert result["peak_running"] == 8 and result["full_s"] > 0
    assert result["gpus_busy"] == 4 and result["trials_per_busy_gpu"] == {"2": 4}
    assert result["enough_s"] >= result["full_s"] and 0 < result["busy_fraction_enough"] <= 1


def test_placement_busy_fraction_counts_every_moment_of_its_window():
    """An idle GPU fails the measure at any moment of its window, not only at the peak: 2 GPUs,
    0.5 GPU per trial. With at least 2 trials running (6 s), two sit on one GPU for 1.5 s; with
    all 3 at once (1 s), both GPUs have work; a run that never has all its trials at once scores
    0."""
    from bench.sim.harness import TrialLog
    from bench.sim.placement import occupancy

    def trial(gpu, start, end):
        return TrialLog(f"t{start}{gpu}", 1, "a", [gpu], start, end, 0)

    packed = [trial(0, 0, 4), trial(0, 1, 3),  # [1, 3]: two trials on GPU 0 only
              trial(1, 2.5, 7), trial(0, 4, 8)]  # [3, 7]: one on each GPU
    result = occupancy(packed, gpus=2, at_once=3)
    assert (result["enough_s"], result["busy_fraction_enough"]) == (6, (1.5 / 2 + 4.5) / 6)
    assert (result["full_s"], result["busy_fraction"]) == (0.5, 1.0)  # [2.5, 3]: 3 running
    assert result["peak_running"] == 3 and result["gpus_busy"] == 2
    assert occupancy(packed, gpus=2, at_once=4)["busy_fraction"] == 0.0  # never 4 at once
    deep = [trial(0, 0, 4), trial(0, 0, 4)]  # all at once, packed: 1 of 2 GPUs
    assert occupancy(deep, gpus=2, at_once=2)["busy_fraction"] == 0.5


def test_tpe_scenario_measures_ask_and_tell_at_each_study_size():
    args = argparse.Namespace(trials="12,24", running=4, mode="both", sampler="sweep")
    result = tpe.run(args)
    assert [r["trials"] for r in result["by_trials"]] == [12, 24]
    assert result["ask_p95_s"] == result["by_trials"][-1]["ask_p95_s"] > 0
    assert result["journal_bytes"] > 0
    assert tpe.verdict(result).startswith(("tpe PASS", "tpe FAIL"))


def test_idle_slot_seconds_integrates_the_free_slots_over_the_window():
    from bench.sim.stage1 import idle_slot_seconds

    # 2 slots over [0, 10]: one busy on [0, 10], the other on [2, 5] and [4, 8] (overlapping:
    # at most 2 count), so the second slot is free on [0, 2] and [8, 10]
    assert idle_slot_seconds([(0, 10), (2, 5), (4, 8)], 2, 0, 10) == 4
    assert idle_slot_seconds([(-5, 3)], 1, 0, 10) == 7  # clipped to the window
    assert idle_slot_seconds([], 3, 1, 2) == 3
