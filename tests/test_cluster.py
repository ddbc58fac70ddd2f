"""Sweeps on a real multi-node Ray on this machine: a head (no CPUs: it only runs the driver, as
in cluster.yaml) and worker nodes on loopback, each its own raylet with its own resources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.cluster_utils import Cluster

from conftest import ROOT, SWEEP_SMOKE, live_rows, result_rows
from tune.artifacts import ArtifactStore

# detect a lost node in seconds, not Ray's default half a minute
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}


@pytest.fixture
def cluster(mnist_available):
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reports so far (a trial that has not reported yet has none)."""
    return {folder.name: result_rows(folder)
            for folder in sorted(experiment.glob("trial-*"))}


TRIALS = 3  # two run at once (one per worker); the third runs after the kill
CVAE_EPOCHS = 4

# The pause seam: a user's setting module (imported by every trial) with two MNIST partitions,
# that makes the first stage-1 training of partition 2 stop after its first CVAE epoch (on the
# store, with its owner record) and wait there until the test removes its node: the kill always
# lands in the middle of a training, on any hardware, with no race.
PAUSE_MODULE = '''
import time
from pathlib import Path

import tune.shared_stage1 as shared
from cmg.data import Setting, get_setting, register_setting

mnist = get_setting("same_dataset_mnist")
register_setting(Setting("mnist_two", family="mnist", source=mnist.source,
                         partitions={p: mnist.partitions[p] for p in (1, 2)}))
PAUSED = Path(__file__).with_name("paused")
_train_model = shared.train_model


def _pause_once(kind, split, cfg, device, checkpoint, callback, **kwargs):
    def after_epoch(epoch, metrics):
        callback(epoch, metrics)  # the checkpoint is on the store and the lease renewed
        if kind == "cvae" and split.partition == 2 and epoch == 1:
            try:
                PAUSED.open("x").close()  # the first training to get here, only
            except FileExistsError:
                return
            time.sleep(3600)  # until its node is removed
    return _train_model(kind, split, cfg, device, checkpoint, after_epoch, **kwargs)


shared.train_model = _pause_once
'''


def _wait_for_pause(storage: Path, experiment: Path, deadline: float) -> dict:
    """The owner record of the paused stage-1 training (partition 2, one CVAE epoch done), with
    the trial that trains it, once that trial has reported partition 1."""
    while time.time() < deadline:
        if (storage / "paused").exists():
            (owner_file,) = storage.glob("stage1/*-p2-cvae-*/partial/owner.json")
            owner = json.loads(owner_file.read_text())
            trial = owner["owner"].rsplit("/", 1)[-1]  # "EXPERIMENT/TRIAL_ID"
            reported = {r[0]["trial_id"]: len(r) for r in map(
                live_rows, experiment.glob("trial-*")) if r}
            if reported.get(trial) == 1:  # the driver has written its partition-1 row
                return {**owner, "trial": trial, "key": owner_file.parent.parent.name}
        time.sleep(0.2)
    raise AssertionError("no stage-1 training paused in time")


def test_a_sweep_spreads_over_the_workers_and_a_lost_worker_loses_nothing(cluster, tmp_path):
    """Trials run on both worker nodes, never on the head. Remove the worker node whose trial
    is training a stage-1 model after finishing a partition: the trial is retried from its
    checkpoint (not from scratch), the stage-1 training resumes from its last epoch, and the
    sweep completes every trial exactly once. No prewarm: the trials train stage 1 themselves."""
    c, workers = cluster
    (tmp_path / "pause_seam.py").write_text(PAUSE_MODULE)
    space = tmp_path / "space.yaml"
    space.write_text("latent_dim: 32\nlr: 1.0e-4\nepochs: 1\nood_per_batch: 64\n")
    args = ["--address", c.address, "--setting", "pause_seam:mnist_two", "--num-samples",
            str(TRIALS), "--storage", str(tmp_path), "--name", "lost", "--space", str(space),
            "--scheduler", "none", "--no-prewarm", "--max-failures", "3", "--no-report",
            *SWEEP_SMOKE, "--set", f"cvae.epochs={CVAE_EPOCHS}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    sweep = subprocess.Popen([sys.executable, "-m", "tune.sweep", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # both waits together stay under pytest's 600 s
        victim = _wait_for_pause(tmp_path, tmp_path / "lost", time.time() + 240)
        node = next(w for w in workers if w.node_id == victim["node_id"])
        c.remove_node(node, allow_graceful=False)  # a spot worker disappears
        replacement = c.add_node(num_cpus=1)  # and the autoscaler replaces it
        output, _ = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    wall = time.time() - started

    rows = trial_rows(tmp_path / "lost")
    assert len(rows) == TRIALS
    seen = {row["node_id"] for r in rows.values() for row in r}  # both workers, not the head
    assert {w.node_id for w in workers} <= seen <= {w.node_id for w in workers} | {
        replacement.node_id}
    for trial in rows.values():  # every partition exactly once, in order: nothing lost or redone
        assert [r["partition"] for r in trial] == [1, 2]
    retried = [t for t in rows.values() if t[0]["trial_id"] == victim["trial"]][0]
    before, after = retried[:1], retried[1:]
    # partition 1 ran on the lost node; partition 2 elsewhere, restored from its checkpoint
    assert before[0]["node_id"] == victim["node_id"] and before[0]["restored_partitions"] == 0
    assert after[0]["restored_partitions"] == 1 and after[0]["node_id"] != victim["node_id"]

    meta = json.loads((tmp_path / "stage1" / victim["key"] / "meta.json").read_text())
    assert meta["resumed_from"] == {"cvae": 1}  # from the store, not retrained
    assert meta["node_id"] != victim["node_id"] and meta["trained_by"].startswith("lost/")
    assert [h["epoch"] for h in meta["history"]] == list(range(1, CVAE_EPOCHS + 1))
    # the store's training log: started on the lost node, then resumed once elsewhere
    log = ArtifactStore(str(tmp_path / "stage1")).trainings(victim["key"])
    assert [t["node_id"] == victim["node_id"] for t in log] == [True, False]
    assert log[1]["resumed_from"] == meta["resumed_from"]

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="lost", storage=JournalStorage(
        JournalFileBackend(str(tmp_path / "lost" / "optuna.journal"))))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * TRIALS  # none lost, none extra
    nodes = sorted({r["node_id"][:8] for t in rows.values() for r in t})
    retried_ids = sorted(t[0]["trial_id"] for t in rows.values()
                         if any(r["restored_partitions"] for r in t))
    print(f"\nlost-worker sweep: {TRIALS} trials complete on nodes {nodes}; killed node "
          f"{victim['node_id'][:8]} while it trained {victim['key']} for trial {victim['trial']}; "
          f"retried from their checkpoints: {retried_ids} (on "
          f"{sorted({r['node_id'][:8] for r in retried[1:]})}); the CVAE resumed at epoch "
          f"{meta['resumed_from']['cvae']} on node {meta['node_id'][:8]}; wall {wall:.1f} s")
