"""The documented cluster launch from a cold start, on Ray's own autoscaler with its fake
multi-node provider on this machine: cluster.yaml's node types (a head with 0 CPUs, GPU workers
with `min_workers: 0` and logical GPUs), nothing running but the head when the sweep starts.

The trials are stand-ins (a second per partition, reporting what the sweep's driver reads), so
the test measures placement and scale-up, not training, and fits a 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time

import psutil
import pytest
import ray
import yaml
from ray import cloudpickle
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.cluster_utils import Cluster

from cmg.results import OBJECTIVE
from conftest import ROOT, run_main

# the fake workers of a CI run: two nodes, one of each GPU type of cluster.yaml
MAX_WORKERS_PER_TYPE = 1
TRIALS = 3
# what the fake provider's docs ask for (example.yaml of ray-2.60.0, absent from the wheel)
FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True}


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


@pytest.fixture(scope="module")
def cold_cluster(tmp_path_factory):
    """A head (0 CPUs) whose autoscaler (the monitor process, polling every second) starts fake
    GPU nodes on demand. Torn down by process id: the head's processes, then every process the
    monitor started (the fake nodes and their workers); never `ray stop`, which would stop every
    Ray on this machine."""
    port = _free_port()
    address = f"{ray._private.services.get_node_ip_address()}:{port}"
    config = tmp_path_factory.mktemp("cold") / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(address)))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():  # the monitor inherits them
            patch.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": port, "autoscaling_config": str(config),
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


def standin_trial(config: dict, partitions: tuple[int, ...]) -> None:
    """A trial of one second per partition that reports where it ran and on which GPUs."""
    from ray import tune

    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    for done, partition in enumerate(partitions, 1):
        time.sleep(1)
        tune.report({"partition": partition, "partitions_done": done,
                     "partitions_total": len(partitions), "val_auroc": 0.5,
                     OBJECTIVE: 0.5, **where})


def standin(spec, gpus):
    """`run_sweep`'s trial_fn: the stand-in over the sweep's partitions."""
    partitions = tuple(spec.partitions)

    def stage2_trainable(config: dict) -> None:
        standin_trial(config, partitions)

    return stage2_trainable


# the fake nodes' workers import this module's functions by value, not from tests/
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_sweep_on_a_cold_autoscaling_cluster_scales_out_and_finishes(cold_cluster, tmp_path,
                                                                       capfd, monkeypatch):
    """The documented command shape (--address, no --gpus-per-trial, no --max-concurrent) on a
    cluster with only its CPU head up: the sweep neither exits nor falls back to CPU; it says it
    waits; the autoscaler adds GPU nodes; every trial runs on one with a GPU; none on the head."""
    from tune.driver import run_sweep
    from tune.sweep import build_spec

    head = cold_cluster.head_node.node_id
    alive = [n for n in cold_cluster.global_state.node_table() if n["Alive"]]
    assert [n["NodeID"] for n in alive] == [head] and "GPU" not in alive[0]["Resources"]  # cold
    spec, _, _ = build_spec(["--address", cold_cluster.address, "--setting", "synthetic_cifar10",
                             "--budget", "smoke", "--num-samples", str(TRIALS), "--storage",
                             str(tmp_path), "--no-prewarm", "--no-report"])
    for stream in ("stdout", "stderr"):  # the process's own (Tune pickles the progress
        monkeypatch.setattr(sys, stream, getattr(sys, f"__{stream}__"))  # callback's stream)
    started = time.monotonic()
    summary = run_sweep(spec, trial_fn=standin)
    wall = time.monotonic() - started
    monkeypatch.undo()
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[")]
    print("\n".join(printed[:4]), f"\n... sweep finished in {wall:.0f} s", file=sys.stderr)

    assert summary["trials"] == {"total": TRIALS, "complete": TRIALS, "pruned": 0, "failed": 0}
    # the choices and the wait, each on its line: 1 GPU per trial, 5 at once (1 + 4 GPUs of the
    # two node types), capped at the 3 configurations; nothing up yet
    assert printed[0].startswith("[sweep] 1 GPU per trial (default: 5 GPUs in the "
                                 "autoscaler's node types: gpu_1x 1 x (4 CPU, 1 GPU), gpu_4x 1 x "
                                 "(48 CPU, 4 GPU); a whole GPU each")
    assert printed[1].startswith(f"[sweep] up to {TRIALS} trials at once")
    assert printed[2].startswith(f"[sweep] waiting for the autoscaler: the nodes up now run 0 "
                                 f"of the {TRIALS} trials")
    rows = _results(tmp_path / spec.options.name)
    assert len(rows) == TRIALS * 5
    assert all(r["node_id"] != head and len(r["gpu_ids"]) == 1 for r in rows)
    gpu_nodes = {r["node_id"] for r in rows}
    assert 1 <= len(gpu_nodes) <= 2  # nodes the autoscaler added, each of a GPU type


def _results(experiment) -> list[dict]:
    import json

    return [json.loads(line) for path in experiment.glob("trial-*/result.json")
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
