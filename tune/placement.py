"""Where a sweep's trials can run, decided before the first one starts: the shapes of the
cluster's nodes (those alive and, on an autoscaling cluster, the node types its autoscaler can
add), the GPU share of a trial, how many trials run at once, and a one-line refusal for a trial
that no node (and no node type) could ever hold. Driver-only: call after `ray.init`.

    plan = plan_placement(cpus=1.0, gpus=None, max_concurrent=None, num_samples=64)
    plan.gpus, plan.max_concurrent     # 1.0 on a GPU cluster, the trials its node types run at once
    plan.lines                          # what the driver prints: each choice and why, one line each

A cold autoscaling cluster (a CPU head, GPU workers with `min_workers: 0`, none running yet) is
judged by its node types: the autoscaler's own configuration, read from the GCS (autoscaler v2,
KubeRay) or from the `--autoscaling-config` file of the cluster's monitor process (Ray's
autoscaler on a `ray up` cluster, where the driver runs on the head).

The GPU share. Ray gives a fractional GPU request the best-fit GPU of its node, so fractional
trials fill one GPU before the next: 64 trials of 0.25 GPU on 8 nodes x 8 GPUs leave 48 GPUs idle
(`bench/sim_cluster.py placement`). A whole GPU per trial keeps every GPU busy as soon as there
are as many trials as GPUs; a share of 1/k is chosen only when `--max-concurrent` asks for k or
more trials per GPU, so that the trials running at once fill every GPU.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import yaml

from cmg.errors import fail

_EPS = 1e-9  # Ray keeps resources in units of 1e-4: 0.25 + 0.25 + 0.25 + 0.25 is one GPU
HEAD = "head"  # the name of the head's node type in a Capacity


@dataclass(frozen=True)
class NodeShape:
    """`count` nodes of one shape: alive now, or the most the autoscaler keeps of a node type."""

    name: str
    cpus: float
    gpus: float
    count: int

    def holds(self, cpus: float, gpus: float) -> int:
        """Trials of CPUS and GPUS that one such node runs at once."""
        fits = math.floor(self.cpus / cpus + _EPS)
        return min(fits, math.floor(self.gpus / gpus + _EPS)) if gpus > 0 else fits

    def describe(self) -> str:
        return f"{self.name} {self.count} x ({self.cpus:g} CPU, {self.gpus:g} GPU)"


@dataclass(frozen=True)
class Capacity:
    """What the cluster has (the nodes alive), or can have (the autoscaler's node types)."""

    shapes: tuple[NodeShape, ...]
    autoscaling: bool  # shapes are node types the autoscaler adds on demand
    max_workers: int | None = None  # the autoscaler's cap on worker nodes of all types together

    def most(self, resource: str) -> float:
        return max((getattr(s, resource) for s in self.shapes), default=0.0)

    def total_gpus(self) -> float:
        return sum(s.gpus * s.count for s in self._capped())

    def slots(self, cpus: float, gpus: float) -> int:
        """Trials of CPUS and GPUS that the cluster runs at once, at its largest."""
        return sum(s.holds(cpus, gpus) * s.count
                   for s in self._capped(lambda s: s.holds(cpus, gpus)))

    def _capped(self, worth=lambda s: s.gpus) -> list[NodeShape]:
        """The shapes within the autoscaler's `max_workers` (the head is not a worker), the
        most worthwhile nodes first."""
        if self.max_workers is None:
            return list(self.shapes)
        left, kept = self.max_workers, []
        for s in sorted(self.shapes, key=worth, reverse=True):
            count = s.count if s.name == HEAD else min(s.count, left)
            left -= 0 if s.name == HEAD else count
            kept.append(NodeShape(s.name, s.cpus, s.gpus, count))
        return kept

    @property
    def kind(self) -> str:
        return "the autoscaler's node types" if self.autoscaling else "the nodes alive now"

    def where(self) -> str:
        useful = [s.describe() for s in self.shapes if s.count and (s.cpus or s.gpus)]
        return f"{self.kind}: {', '.join(useful) or 'none with CPUs or GPUs'}"


def alive_capacity() -> Capacity:
    """The nodes alive now, grouped by shape."""
    counts: dict[tuple[float, float], int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            r = node["Resources"]
            shape = (float(r.get("CPU", 0)), float(r.get("GPU", 0)))
            counts[shape] = counts.get(shape, 0) + 1
    return Capacity(tuple(NodeShape("node", c, g, n) for (c, g), n in sorted(counts.items())),
                    autoscaling=False)


def autoscaler_capacity(gcs_address: str) -> Capacity | None:
    """The node types of the cluster's autoscaler, None without one."""
    from ray._private.state import state

    reported = state.get_cluster_config()  # autoscaler v2 and KubeRay report it to the GCS
    if reported is not None and reported.node_group_configs:
        if not any(g.resources for g in reported.node_group_configs):
            return None  # shapes Ray detects on the machines (provider: local): see below
        return Capacity(tuple(
            NodeShape(g.name or "node", float(g.resources.get("CPU", 0)),
                      float(g.resources.get("GPU", 0)), g.max_count if g.max_count >= 0 else 10**6)
            for g in reported.node_group_configs), autoscaling=True)
    path = monitor_config_path(gcs_address)
    if path is None:
        return None
    with open(path) as f:
        return capacity_from_config(yaml.safe_load(f))


def capacity_from_config(config: dict[str, Any]) -> Capacity | None:
    """The node types of an autoscaler configuration (cluster.yaml's layout); the head counts
    once, each worker type `max_workers` times. None when a node type leaves its resources to
    Ray's detection on the machine (`resources: {}`: what `ray up` makes of a `provider: local`
    config, one type `local.cluster.node` for every listed machine): then only the nodes alive
    tell the cluster's shape."""
    if any(not t.get("resources") for t in config["available_node_types"].values()):
        return None
    head = config.get("head_node_type")
    shapes = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        count = (1 if name == head
                 else int(node_type.get("max_workers", config.get("max_workers", 0))))
        shapes.append(NodeShape(HEAD if name == head else name, float(resources.get("CPU", 0)),
                                float(resources.get("GPU", 0)), count))
    return Capacity(tuple(shapes), autoscaling=True, max_workers=config.get("max_workers"))


def monitor_config_path(gcs_address: str) -> str | None:
    """The `--autoscaling-config` file of this cluster's autoscaler (Ray's monitor process,
    started by `ray start --head --autoscaling-config=...`), if it runs on this machine."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if f"--gcs-address={gcs_address}" in args and any(a.endswith("monitor.py") for a in args):
            for arg in args:
                if arg.startswith("--autoscaling-config="):
                    path = os.path.expanduser(arg.split("=", 1)[1])
                    return path if os.path.isfile(path) else None
    return None


@dataclass(frozen=True)
class Placement:
    """A trial's resources, the trials at once, and the lines that say why."""

    cpus: float
    gpus: float
    max_concurrent: int
    lines: tuple[str, ...]
    stage1_slots: int = 1  # stage-1 prewarm tasks at once: a trial's CPUs, a whole GPU if any


def gpu_share(total_gpus: float, trials_at_once: int | None) -> float:
    """One GPU per trial, or 1/k of one when TRIALS_AT_ONCE asks for k >= 2 trials per GPU
    (k whole, so that that many trials fill every GPU: best-fit packing never leaves one idle)."""
    per_gpu = (trials_at_once or 0) // max(1, math.floor(total_gpus))
    return 1.0 / per_gpu if per_gpu >= 2 else 1.0


def check_fits(capacity: Capacity, cpus: float, gpus: float) -> None:
    """Refuse, in one line, a trial that no node (or node type) can ever hold."""
    where = capacity.where()
    if gpus > capacity.most("gpus"):
        fail(f"--gpus-per-trial {gpus:g} cannot be placed: the cluster has "
             f"{capacity.total_gpus():g} GPUs, at most {capacity.most('gpus'):g} on one node "
             f"({where}); lower --gpus-per-trial or add GPU nodes")
    if cpus > capacity.most("cpus"):
        fail(f"--cpus-per-trial {cpus:g} cannot be placed: the largest node has "
             f"{capacity.most('cpus'):g} CPUs ({where}); lower --cpus-per-trial")
    if capacity.slots(cpus, gpus) == 0:
        fail(f"--cpus-per-trial {cpus:g} with --gpus-per-trial {gpus:g} cannot be placed: no "
             f"node has both ({where}); lower one of them")


def plan_placement(cpus: float, gpus: float | None, max_concurrent: int | None,
                   num_samples: int, wait_for_nodes: float | None = None) -> Placement:
    """Resolve a sweep's trial resources against the cluster Ray is connected to (see the
    module doc); a trial no node can hold is a UsageError. On an autoscaling cluster whose nodes
    up now hold no trial, a deadline of WAIT_FOR_NODES seconds starts (`watch_for_nodes`)."""
    alive = alive_capacity()
    gcs = ray.get_runtime_context().gcs_address
    capacity = autoscaler_capacity(gcs) or alive
    lines = []
    if gpus is None:
        total = capacity.total_gpus()
        gpus = gpu_share(total, max_concurrent) if total else 0.0
        lines.append(_share_line(gpus, total, max_concurrent, capacity.where()))
    check_fits(capacity, cpus, gpus)
    slots = capacity.slots(cpus, gpus)
    if max_concurrent is None:
        max_concurrent = max(1, min(slots, num_samples))
        lines.append(f"up to {max_concurrent} trials at once (default: as many as "
                     f"{capacity.kind} hold "
                     f"with {cpus:g} CPU and {gpus:g} GPU each, at most --num-samples; "
                     "--max-concurrent overrides)")
    now = alive.slots(cpus, gpus)
    if capacity.autoscaling and now < max_concurrent:
        lines.append(f"waiting for the autoscaler: the nodes up now run {now} of the "
                     f"{max_concurrent} trials; it starts more for the pending ones "
                     "(minutes per node; `ray status` shows them)")
        if now == 0 and wait_for_nodes:
            watch_for_nodes(cpus, gpus, wait_for_nodes)
            lines.append(f"no node up can run a trial yet: the sweep gives up if none joins "
                         f"within {_duration(wait_for_nodes)} (--wait-for-nodes)")
    return Placement(cpus, gpus, max_concurrent, tuple(lines), _stage1_slots(capacity, cpus, gpus))


def watch_for_nodes(cpus: float, gpus: float, deadline: float, poll: float = 2.0) -> None:
    """Until a node that can run a trial of CPUS and GPUS is alive, for at most DEADLINE
    seconds: then the driver exits with code 2 and one line naming the likely causes. A
    daemon thread, because the driver's own thread is inside Ray Tune's loop (or the prewarm's
    wait) by then, where a trial that no node takes waits forever; os._exit, because an
    exception raised there would only end this thread."""
    def watch() -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if alive_capacity().slots(cpus, gpus):
                return
            time.sleep(poll)
        print(f"error: no node that can run a trial ({cpus:g} CPU, {gpus:g} GPU) joined in "
              f"{_duration(deadline)}: the autoscaler cannot launch one (an EC2 quota for the "
              "instance type, spot capacity, the image or its id, the head role's permissions); "
              "`ray status` and the autoscaler's log (/tmp/ray/session_latest/logs/monitor.*) on "
              "the head say which; --wait-for-nodes sets the wait", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    threading.Thread(target=watch, name="watch-for-nodes", daemon=True).start()


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _stage1_slots(capacity: Capacity, cpus: float, gpus: float) -> int:
    return max(1, capacity.slots(cpus, 1.0 if gpus > 0 else 0.0))


def stage1_slots(cpus: float, gpus: float) -> int:
    """Stage-1 prewarm tasks the cluster runs at once (a trial's CPUs; a whole GPU if the trial
    has a GPU share). Driver-only: call after `ray.init`."""
    capacity = autoscaler_capacity(ray.get_runtime_context().gcs_address) or alive_capacity()
    return _stage1_slots(capacity, cpus, gpus)



def _share_line(gpus: float, total: float, max_concurrent: int | None, where: str) -> str:
    """Why the default GPU share is what it is, in one line."""
    if not total:
        return f"0 GPUs per trial: no GPU in {where}"
    if gpus < 1:
        return (f"{gpus:g} GPU per trial (default: --max-concurrent {max_concurrent} on {total:g} "
                f"GPUs puts {round(1 / gpus)} trials on each; {where})")
    return (f"1 GPU per trial (default: {total:g} GPUs in {where}; a whole GPU each keeps every "
            f"GPU busy once trials reach the GPUs, --max-concurrent k x {total:g} shares each "
            "GPU k ways)")
