"""The documented cluster launch from a cold start, on Ray's own autoscaler v2 (what `ray up`
runs since Ray 2.50) with its fake multi-node provider on this machine: cluster.yaml's node types
(a head with 0 CPUs, GPU workers with `min_workers: 0` and logical GPUs), nothing running but the
head when the sweep starts. The sweep is the real one: `python -m tune.sweep --address ...` with
the stage-1 prewarm and the real trainables at the smoke budget, on MNIST cut to two partitions.

How Ray 2.60 runs v2 here: the GCS has `RAY_enable_autoscaler_v2=1`, so the head starts
`ray/autoscaler/v2/monitor.py`; the fake provider needs `launch_multiple` and the head's cloud
instance id (`head_node_id`), which the head gets as its node id (RAY_OVERRIDE_NODE_ID_FOR_TESTING,
RAY_CLOUD_INSTANCE_ID), as `AutoscalingCluster(autoscaler_v2=True)` does; that class cannot be
used itself: the wheel lacks the `fake_multi_node/example.yaml` it reads, and it runs
`ray stop --force`, which would stop every Ray on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import psutil
import pytest
import ray
import yaml
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import (FAKE_HEAD_NODE_ID,
                                                                   FAKE_HEAD_NODE_TYPE)
from ray.cluster_utils import Cluster

from conftest import ROOT, SWEEP_SMOKE, run_main
from tune.artifacts import ArtifactStore
from tune.trainables import LOGICAL_GPUS

# the fake workers of a CI run: two nodes, one of each GPU type of cluster.yaml (1 + 4 GPUs)
MAX_WORKERS_PER_TYPE = 1
TRIALS = 5  # as many as the two node types' GPUs: the demand needs both nodes at once
# what the fake provider's docs ask for (example.yaml of ray-2.60.0, absent from the wheel), and
# autoscaler v2's launch of several nodes per request. The provider is named as an external
# module: v2 fills a config out with its provider type's defaults, and for "fake_multinode"
# those are the missing example.yaml (the monitor dies with FileNotFoundError)
FAKE_PROVIDER = {"type": "external",
                 "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                           "FakeMultiNodeProvider",
                 "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True,
                 "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
AUTOSCALER_V2 = {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                 "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
# a setting module on the trials' path (the sweep runs in its folder): MNIST's first two partitions
TWO_PARTITIONS = """
from cmg.data import Setting, get_setting, register_setting

mnist = get_setting("same_dataset_mnist")
register_setting(Setting("mnist_two", family="mnist", source=mnist.source,
                         partitions={p: mnist.partitions[p] for p in (1, 2)}))
"""


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's node types and resources for the fake provider: its head type under the
    name the provider gives its head, no cloud settings, at most one worker of each type."""
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {}
    for name, node_type in real["available_node_types"].items():
        head = name == real["head_node_type"]
        types[FAKE_HEAD_NODE_TYPE if head else name] = {
            "resources": node_type["resources"], "node_config": {},
            "min_workers": 0 if head else node_type["min_workers"],
            "max_workers": 0 if head else MAX_WORKERS_PER_TYPE}
    return {"cluster_name": "cmg-cold", "max_workers": MAX_WORKERS_PER_TYPE * (len(types) - 1),
            "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": 1,
            "provider": {**FAKE_PROVIDER, "gcs_address": gcs_address}, "auth": {},
            "available_node_types": types, "head_node_type": FAKE_HEAD_NODE_TYPE,
            "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def head_with_autoscaler(config_for: Callable[[str], dict], folder, env: dict[str, str]):
    """A head (0 CPUs) started with `--autoscaling-config` CONFIG_FOR(its GCS address), as
    `ray up` starts one; torn down by process id (its processes, then the monitor's children),
    never `ray stop`."""
    port = _free_port()
    path = folder / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config_for(
        f"{ray._private.services.get_node_ip_address()}:{port}")))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():  # the monitor inherits them
            patch.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": port, "autoscaling_config": str(path),
            "include_dashboard": False})
    monitor = psutil.Process(
        cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process.pid)
    try:
        yield cluster
    finally:
        started = monitor.children(recursive=True)
        cluster.shutdown()
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(started, timeout=10)


@pytest.fixture(scope="module")
def cold_cluster(tmp_path_factory):
    """A head (0 CPUs) whose autoscaler v2 (the monitor process, polling every second) starts
    fake GPU nodes on demand (`head_with_autoscaler`: torn down by process id)."""
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **AUTOSCALER_V2,
           LOGICAL_GPUS: "1"}  # the fake nodes' GPUs are logical: their trials use the CPU
    folder = tmp_path_factory.mktemp("cold")
    with head_with_autoscaler(fake_cluster_config, folder, env) as cluster:
        yield cluster


def _worker_nodes(gcs_address: str, stop: threading.Event, seen: list[set[str]]) -> None:
    """Every second until `stop`: the ids of the worker nodes alive (from the GCS's node table)."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(
        gcs_address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
    while not stop.wait(1.0):
        seen.append({n["NodeID"] for n in state.node_table()
                     if n["Alive"] and n["NodeID"] != FAKE_HEAD_NODE_ID})


@pytest.mark.slow  # 164 to 385 s with the 2 cores shared by other runs (load 17 to 25)
def test_a_sweep_on_a_cold_autoscaling_cluster_prewarms_first_and_scales_out(cold_cluster,
                                                                             tmp_path):
    """The documented command shape (--address, no --gpus-per-trial, no --max-concurrent) on a
    cluster with only its CPU head up: the autoscaler (v2) starts both GPU nodes at once; the
    stage-1 prewarm gets the GPUs first, so every stage-1 model is trained once, by its prewarm
    task, and no trial trains one inside its slot; every trial runs on a GPU node, none on the
    head, and every partition of every trial once."""
    head = cold_cluster.head_node.node_id
    assert head == FAKE_HEAD_NODE_ID  # the provider's head: autoscaler v2 knows it
    assert "autoscaler/v2/monitor.py" in " ".join(psutil.Process(
        cold_cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process.pid
    ).cmdline())
    alive = [n for n in cold_cluster.global_state.node_table() if n["Alive"]]
    assert [n["NodeID"] for n in alive] == [head] and "GPU" not in alive[0]["Resources"]  # cold
    (tmp_path / "two_parts.py").write_text(TWO_PARTITIONS)
    (tmp_path / "space.yaml").write_text("latent_dim: 32\n")  # 2 classifiers, 2 CVAEs
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_worker_nodes, args=(cold_cluster.address, stop, seen))
    watcher.start()
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tune.sweep", "--address", cold_cluster.address, "--setting",
             "two_parts:mnist_two", "--num-samples", str(TRIALS), "--space", "space.yaml",
             "--storage", str(tmp_path), "--name", "cold", "--scheduler", "none", "--no-report",
             "--max-failures", "0", *SWEEP_SMOKE, "--no-quiet"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            text=True, timeout=540)
    finally:
        stop.set()
        watcher.join()
    wall = time.monotonic() - started
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[sweep]")]
    print("\n".join(printed[:5]), f"\n... sweep finished in {wall:.0f} s; worker nodes at "
          f"once, at most: {max(map(len, seen), default=0)}", file=sys.stderr)
    assert proc.returncode == 0 and "failed:" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "cold" / "summary.json").read_text())
    assert summary["trials"] == {"total": TRIALS, "complete": TRIALS, "pruned": 0, "failed": 0}
    assert any(line.startswith("[sweep] waiting for the autoscaler: the nodes up now run 0 of")
               for line in printed)
    assert any(len(nodes) >= 2 for nodes in seen)  # both GPU nodes up at once
    # every stage-1 model trained once, by the prewarm; none in a trial's slot
    store = ArtifactStore(str(tmp_path / "stage1"))
    assert len(store.keys()) == 4
    owners = [[r["owner"] for r in store.trainings(key)] for key in store.keys()]
    assert all(len(o) == 1 and o[0].startswith("cold/prewarm-") for o in owners), owners
    assert summary["stage1_trained"] == 4 and summary["stage1_reused"] == TRIALS * 2
    rows = _results(tmp_path / "cold")
    assert sorted((r["trial_id"], r["partition"]) for r in rows) == sorted(
        {(r["trial_id"], p) for r in rows for p in (1, 2)})  # each partition once
    assert len(rows) == TRIALS * 2 and all(r["stage1_trained"] == 0 for r in rows)
    assert all(r["node_id"] != head for r in rows)
    metas = [store.read_json(key) for key in store.keys()]
    assert all(m["node_id"] != head for m in metas)  # the prewarm ran on GPU nodes too


def _results(experiment) -> list[dict]:
    """Every trial's partition rows (the full rows it writes itself, cmg.results.ROWS_FILE)."""
    from cmg.results import ROWS_FILE

    return [json.loads(line) for path in experiment.glob(f"trial-*/{ROWS_FILE}")
            for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("args, words", [
    (["--gpus-per-trial", "8"], ["--gpus-per-trial 8 cannot be placed: the cluster has 5 GPUs, "
                                 "at most 4 on one node (the autoscaler's node types"]),
    (["--cpus-per-trial", "64"], ["--cpus-per-trial 64 cannot be placed: the largest node "
                                  "has 48 CPUs"]),
])
def test_what_no_node_type_can_hold_is_refused_at_once(cold_cluster, tmp_path, args, words):
    """Judged by the node types, not by the nodes up now: one line, exit 2, in seconds."""
    started = time.monotonic()
    proc = run_main("tune.sweep", "--address", cold_cluster.address, "--setting",
                    "synthetic_cifar10", "--budget", "smoke", "--storage", str(tmp_path / "s"),
                    "--quiet", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words)
    print(f"refused in {time.monotonic() - started:.1f} s: {proc.stderr.strip()}",
          file=sys.stderr)
