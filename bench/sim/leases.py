"""leases: the stage-1 lease service under contention and chaos, on a simulated Ray cluster.

W waiters (distinct owners: threads in actors spread over the worker nodes) each need all K
stage-1 keys, in their own order, through the real lease service (`create_leases`: one detached
actor per store) and the real waiting loop (`tune.shared_stage1.train_once`: acquire, heartbeat,
publish). The stand-in training sleeps `--train-s` in steps (the heartbeat renewing, `check()`
after each step, progress saved so a takeover resumes), writes small files to a real
ArtifactStore and logs itself in the store's training log, as stage 1 does. Chaos, while keys
train:
- `second-driver`: another driver starts the service and exits before this one uses it;
- `node`: a holder's node is removed (`Cluster.remove_node`, not graceful);
- `proc`: a holder's process is SIGKILLed on a node that lives (its lease must expire).

    python bench/sim_cluster.py leases --waiters 64 --keys 15 --out leases.json

Reports trainings per key from the store's training log (those that ran to the end: exactly one
per key; the others were interrupted by a chaos event and taken over), the takeover time after
each chaos event (event -> the next training of each key it interrupted started), acquire round
trips, meta.json written -> each waiter done, and the service's CPU share.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from bench.sim.harness import FAST_FAILURE_DETECTION, OBJECT_STORE_BYTES, percentile

ROOT = Path(__file__).resolve().parents[2]
CHAOS = ("second-driver", "node", "proc")
STEPS = 8  # progress saves per stand-in training


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


def _chaos(text: str) -> tuple[str, ...]:
    events = tuple(e for e in text.split(",") if e)
    unknown = [e for e in events if e not in CHAOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown chaos {','.join(unknown)}; "
                                         f"choose from {','.join(CHAOS)} (or '' for none)")
    return events


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=_positive(int), default=4, help="worker nodes")
    parser.add_argument("--actors-per-node", type=_positive(int), default=2,
                        help="waiter processes per node (the waiters are their threads)")
    parser.add_argument("--waiters", type=_positive(int), default=64)
    parser.add_argument("--keys", type=_positive(int), default=15)
    parser.add_argument("--train-s", type=_positive(float), default=8.0,
                        help="stand-in training time per key")
    parser.add_argument("--poll-s", type=_positive(float), default=1.0,
                        help="how often a waiter asks for the lease (SharedStage1's default)")
    parser.add_argument("--chaos", type=_chaos, default=CHAOS,
                        help=f"comma-separated events among {','.join(CHAOS)}")
    parser.add_argument("--seed", type=int, default=0, help="the waiters' key orders")


def stand_in_training(store, key: str, owner: str, train_s: float,
                      check) -> None:
    """Stage 1's footprint on the store without its compute: owner record and training log,
    progress after each step (resumed by a takeover), the artifact files, meta.json last."""
    from tune.leases import node_id

    resumed = (store.read_json(key, "partial/progress.json")["step"]
               if store.exists(key, "partial/progress.json") else None)
    record = {"owner": owner, "node_id": node_id(), "pid": os.getpid(), "started": time.time(),
              "resumed_from": resumed}
    store.write_json(key, "partial/owner.json", record)
    store.log_training(key, record)
    for step in range(resumed or 0, STEPS):
        time.sleep(train_s / STEPS)
        store.write_json(key, "partial/progress.json", {"step": step + 1})
        check()
    for name in ("classifier.pt", "cvae.pt", "features.pt"):
        store.write_bytes(key, name, bytes(64 << 10))
    store.write_json(key, "meta.json", {"key": key, "trained_by": owner, "written": time.time()})


class TimedLeases:
    """The service's handle, timing each acquire round trip (submitted -> answer ready)."""

    class _Acquire:
        def __init__(self, method, seconds: list[float]):
            self.method, self.seconds = method, seconds

        def remote(self, *args):
            started = time.perf_counter()
            ref = self.method.remote(*args)
            ray.wait([ref])
            self.seconds.append(time.perf_counter() - started)
            return ref

    def __init__(self, handle):
        self.seconds: list[float] = []
        self.acquire = self._Acquire(handle.acquire, self.seconds)
        self.renew, self.release, self.publish = handle.renew, handle.release, handle.publish


@ray.remote(num_cpus=1)
class WaiterGroup:
    """One process of waiter threads: killing it (or its node) kills every waiter in it."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, store_uri: str, orders: dict[str, list[str]], train_s: float,
            poll_s: float) -> dict:
        from tune.artifacts import ArtifactStore
        from tune.leases import get_leases
        from tune.shared_stage1 import train_once

        store, leases = ArtifactStore(store_uri), TimedLeases(get_leases(store_uri))
        done: list[dict] = []

        def waiter(owner: str, keys: list[str]) -> None:
            for key in keys:
                asked = time.time()
                trained = train_once(
                    leases, key, owner, lambda: store.exists(key),
                    lambda check: stand_in_training(store, key, owner, train_s, check), poll_s)
                store.read_json(key)  # "load" it
                done.append({"owner": owner, "key": key, "trained": trained, "asked": asked,
                             "done": time.time()})

        threads = [threading.Thread(target=waiter, args=item) for item in orders.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"done": done, "acquire_s": leases.seconds}


def _start_service_from_another_driver(address: str, store_uri: str) -> str:
    """A second driver connects, starts the store's lease service and exits; its actor id."""
    code = ("import ray\nfrom tune.leases import NAMESPACE, create_leases\n"
            f"ray.init(address={address!r}, namespace=NAMESPACE, log_to_driver=False)\n"
            f"service = create_leases({store_uri!r})\n"
            "ray.get(service.__ray_ready__.remote())\n"
            "print(service._actor_id.hex())\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return proc.stdout.split()[-1]


def _in_training(store, keys: list[str]) -> dict[str, dict]:
    """The owner record of every key being trained now (owner.json written, meta.json not)."""
    holders = {}
    for key in keys:
        if store.exists(key, "partial/owner.json") and not store.exists(key):
            holders[key] = store.read_json(key, "partial/owner.json")
    return holders


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 4)


def run(args: argparse.Namespace) -> dict:
    from tune.artifacts import ArtifactStore
    from tune.leases import LEASE_SECONDS, NAMESPACE, RENEW_SECONDS, create_leases

    groups_n = args.nodes * args.actors_per_node
    tmp = tempfile.TemporaryDirectory(prefix="cmg-sim-leases-")
    store_uri = str(Path(tmp.name) / "stage1")
    store = ArtifactStore(store_uri)
    keys = [f"sim-p{i % 5 + 1}-{i:04d}" for i in range(args.keys)]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES,
        "_system_config": FAST_FAILURE_DETECTION})
    result: dict = {"nodes": args.nodes, "waiters": args.waiters, "keys": args.keys,
                    "train_s": args.train_s, "poll_s": args.poll_s, "chaos": list(args.chaos),
                    "lease_seconds": LEASE_SECONDS, "renew_seconds": RENEW_SECONDS}
    try:
        nodes = [cluster.add_node(num_cpus=args.actors_per_node,
                                  object_store_memory=OBJECT_STORE_BYTES)
                 for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        started_by = (_start_service_from_another_driver(cluster.address, store_uri)
                      if "second-driver" in args.chaos else None)
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        service = create_leases(store_uri)
        service_pid = ray.get(service.__ray_call__.remote(lambda self: os.getpid()))
        if started_by is not None:
            result["second_driver_service_survived"] = service._actor_id.hex() == started_by
        groups = [WaiterGroup.options(scheduling_strategy="SPREAD").remote()
                  for _ in range(groups_n)]
        pids = ray.get([g.pid.remote() for g in groups])
        rng = random.Random(args.seed)
        orders: list[dict[str, list[str]]] = [{} for _ in groups]
        for w in range(args.waiters):
            orders[w % groups_n][f"waiter-{w:04d}"] = rng.sample(keys, len(keys))
        cpu_before, t0 = _cpu_seconds(service_pid), time.time()
        runs = {g.run.remote(store_uri, order, args.train_s, args.poll_s): i
                for i, (g, order) in enumerate(zip(groups, orders))}
        events = _chaos_events(args.chaos, cluster, nodes, store, keys, pids)
        finished, killed = [], []
        for ref, i in runs.items():
            try:
                finished.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                killed.append(i)
        wall = time.time() - t0
        result["service_cpu_percent"] = round(100 * (_cpu_seconds(service_pid) - cpu_before)
                                              / wall, 2)
        result.update(_measure(store, keys, finished, events, wall))
        result["waiter_processes_killed"] = len(killed)
        keys_done = Counter(d["owner"] for r in finished for d in r["done"])
        result["waiters_done_with_every_key"] = sum(n == len(keys) for n in keys_done.values())
    finally:
        ray.shutdown()
        cluster.shutdown()
        tmp.cleanup()
    return result


def _chaos_events(chaos: tuple[str, ...], cluster: Cluster, nodes: list, store, keys: list[str],
                  pids: list[int]) -> list[dict]:
    """Apply `node` then `proc` chaos to holders found training; one record per event."""
    events: list[dict] = []
    pending = [e for e in ("node", "proc") if e in chaos]
    hit_nodes: set[str] = set()
    deadline = time.time() + 120
    while pending and time.time() < deadline:
        holders = {k: h for k, h in _in_training(store, keys).items()
                   if h["node_id"] not in hit_nodes}
        if not holders:
            time.sleep(0.1)
            continue
        key, holder = max(holders.items(), key=lambda item: item[1]["started"])  # most to go
        event = pending.pop(0)
        if event == "node":
            node = next(n for n in nodes if n.node_id == holder["node_id"])
            cluster.remove_node(node, allow_graceful=False)
            hit_nodes.add(holder["node_id"])
            hit = sorted(k for k, h in holders.items() if h["node_id"] == holder["node_id"])
            events.append({"event": event, "at": time.time(), "keys": hit,
                           "node_id": holder["node_id"]})
        else:
            assert holder["pid"] in pids
            os.kill(holder["pid"], signal.SIGKILL)
            hit = sorted(k for k, h in holders.items() if h["pid"] == holder["pid"])
            events.append({"event": event, "at": time.time(), "keys": hit, "pid": holder["pid"]})
    return events


def _measure(store, keys: list[str], finished: list[dict], events: list[dict],
             wall: float) -> dict:
    logs = {key: store.trainings(key) for key in keys}
    written = {key: store.read_json(key)["written"] for key in keys if store.exists(key)}

    def interrupted(record: dict, key: str) -> bool:
        """Its holder was killed by a chaos event before the key was written."""
        return any(record["started"] < e["at"] < written.get(key, float("inf"))
                   and (record["node_id"] == e.get("node_id") or record["pid"] == e.get("pid"))
                   for e in events)

    # trainings per key: those that ran to the end (the others were killed, and resumed)
    completed = {key: sum(not interrupted(r, key) for r in log) for key, log in logs.items()}
    late = sum(r["started"] > written.get(key, float("inf")) for key, log in logs.items()
               for r in log)
    for event in events:  # takeover: the event -> the next training of each key it interrupted
        event["keys"] = [k for k in event["keys"] if written.get(k, float("inf")) > event["at"]]
        delays = [min((r["started"] - event["at"] for r in logs[key]
                       if r["started"] > event["at"]), default=None) for key in event["keys"]]
        event["takeover_s"] = (None if None in delays or not delays else round(max(delays), 2))
        event["at"] = round(event["at"], 2)
    done = [d for r in finished for d in r["done"]]
    after_publish = [d["done"] - written[d["key"]] for d in done
                     if not d["trained"] and d["asked"] < written[d["key"]]]
    acquire = [s for r in finished for s in r["acquire_s"]]
    takeovers = [e["takeover_s"] for e in events]
    return {
        "wall_s": round(wall, 2),
        "keys_published": len(written),
        "max_trainings_per_key": max(completed.values()),
        "min_trainings_per_key": min(completed.values()),
        "max_log_entries_per_key": max(len(log) for log in logs.values()),
        "interrupted_trainings": sum(len(logs[k]) - completed[k] for k in keys),
        "resumed_trainings": sum(r["resumed_from"] is not None for log in logs.values()
                                 for r in log),
        "trainings_started_after_publish": late,
        "trained_by_waiters": sum(d["trained"] for d in done),
        "events": events,
        "takeover_s": (None if not takeovers or None in takeovers else max(takeovers)),
        "acquire_calls": len(acquire),
        "acquire_p50_s": _percentile(acquire, 50),
        "acquire_p99_s": _percentile(acquire, 99),
        "written_to_waiter_done_p50_s": _percentile(after_publish, 50),
        "written_to_waiter_done_max_s": _percentile(after_publish, 100),
    }


def verdict(result: dict) -> str:
    checks = {
        "every key published": result["keys_published"] == result["keys"],
        "one training per key": (result["max_trainings_per_key"]
                                 == result["min_trainings_per_key"] == 1
                                 and result["trainings_started_after_publish"] == 0),
        "takeover < 30 s": (result["takeover_s"] is not None and result["takeover_s"] < 30
                            or not {"node", "proc"} & set(result["chaos"])),
        "a driver's exit keeps the service": result.get("second_driver_service_survived", True),
    }
    failed = [name for name, ok in checks.items() if not ok]
    figures = (f"trainings/key {result['max_trainings_per_key']}, "
               f"takeover {result['takeover_s']} s, "
               f"acquire p50 {result['acquire_p50_s']} s p99 {result['acquire_p99_s']} s, "
               f"service CPU {result['service_cpu_percent']}%")
    return f"leases: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}: {figures}"
