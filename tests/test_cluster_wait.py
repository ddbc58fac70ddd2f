"""tune/placement.py against a real Ray head whose autoscaler (Ray's monitor process) runs a
configuration of ours: the on-premises example as `ray up` resolves it (every machine one node
type of unknown resources: the nodes alive decide), and cluster.yaml's GPU node types when no node
ever comes (the sweep gives up after --wait-for-nodes, exit 2, one line)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import ray
import yaml

from conftest import ROOT, SWEEP_SMOKE, run_sweep
from test_cold_cluster import fake_cluster_config, head_with_autoscaler


def onprem_as_ray_up_resolves_it(tmp_path, monkeypatch) -> dict:
    """examples/cluster-onprem.yaml through `ray up`'s own config step (prepare_config, the
    local provider's fill-in, the schema, its bootstrap), its machines on loopback addresses
    where no SSH answers (the autoscaler's attempts to set them up fail at once)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    config = yaml.safe_load((ROOT / "examples/cluster-onprem.yaml").read_text())
    config["cluster_name"] = f"cmg-onprem-test-{os.getpid()}"  # its state file: ours alone
    config["provider"].update(head_ip="127.0.0.1", worker_ips=["127.0.0.2", "127.0.0.3"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # ray up's config cache
    return _bootstrap_config(config, no_config_cache=True)


@pytest.mark.slow
def test_onprem_config_is_judged_by_the_live_nodes(tmp_path, monkeypatch):
    """The documented on-prem command leaves the GPU share to the cluster (a whole GPU); an
    explicit --gpus-per-trial 0.25 is taken. Both were refused or zeroed before: `ray up` gives
    the machines a node type with `resources: {}`, read as 0 GPUs."""
    from tune.placement import capacity_from_config, plan_placement
    from tune.sweep import build_parser

    from test_cluster_config import _launch_command

    resolved = onprem_as_ray_up_resolves_it(tmp_path, monkeypatch)
    assert resolved["available_node_types"] == {"local.cluster.node": {
        "node_config": {}, "resources": {}, "min_workers": 2, "max_workers": 2}}
    assert capacity_from_config(resolved) is None  # no shape to read: the live nodes tell
    documented = build_parser().parse_args(_launch_command("examples/cluster-onprem.yaml"))
    assert documented.gpus_per_trial is None
    try:
        with head_with_autoscaler(lambda _: resolved, tmp_path, {}) as cluster:
            for _ in range(2):  # the two machines, 2 CPUs and 2 logical GPUs each
                cluster.add_node(num_cpus=2, num_gpus=2)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            try:
                plans = {gpus: plan_placement(1.0, gpus, None, 64) for gpus in (None, 0.25)}
            finally:
                ray.shutdown()
    finally:  # the local provider's own files, beside every Ray's
        from ray.autoscaler._private.local.config import get_lock_path, get_state_path

        for path in (get_state_path(resolved["cluster_name"]),
                     get_lock_path(resolved["cluster_name"])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    for gpus, plan in plans.items():
        share = 1.0 if gpus is None else gpus
        assert plan.gpus == share
        assert plan.max_concurrent == 2 * min(2, int(2 / share))  # nodes x min(CPUs, GPU slots)
        assert not any("waiting for the autoscaler" in line for line in plan.lines)
    assert "(default: 4 GPUs in the nodes alive now: node 2 x (2 CPU, 2 GPU)" in \
        plans[None].lines[0]


@pytest.mark.slow
def test_a_cluster_that_never_brings_a_gpu_node_is_given_up_on(tmp_path):
    """cluster.yaml's node types behind a real autoscaler that launches nothing (it updates once
    at start, then after an hour): the sweep says it waits, then exits 2 after --wait-for-nodes
    with one line naming `ray status` and the likely causes."""
    with head_with_autoscaler(
            fake_cluster_config, tmp_path,
            {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "3600"}) as cluster:
        done = run_sweep("--setting", "synthetic_cifar10", *SWEEP_SMOKE, "--no-quiet",
                         "--num-samples", "2", "--address", cluster.address,
                         "--storage", str(tmp_path / "runs"), "--wait-for-nodes", "8s",
                         timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "waiting for the autoscaler: the nodes up now run 0 of the" in done.stdout
    assert "gives up if none joins within 8 s (--wait-for-nodes)" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no node that can run a trial (1 CPU, 1 GPU) joined in 8 s")
    for words in ("quota", "image", "permissions", "`ray status`", "--wait-for-nodes"):
        assert words in last
    assert "Traceback" not in done.stderr
