"""The stage-1 lease service: who trains which stage-1 key of a store, one trainer at a time,
across every sweep and driver on a Ray cluster (tune/shared_stage1.py trains and publishes under
it). One detached actor per stage-1 store (`create_leases`), on the head node and named after the
store, so it outlives any one driver and any lost worker node. A lease is free again when its
holder's node is gone or when it was not renewed for `LEASE_SECONDS`; the service knows which
keys are published, so a waiter whose file system still shows the key missing is told so.

This module needs Ray and the standard library only: the service's process (one per cluster)
imports it alone, without torch, scikit-learn or the training code.

    leases = create_leases(store.uri)        # the driver, once per sweep
    ray.get(leases.acquire.remote(key, "sweep/t1", node_id()))   # "granted", "held", "published"
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, NamedTuple

import ray

from cmg.results import is_uri

LEASE_SECONDS = 15.0  # a lease not renewed for this long is free: its holder's process died
RENEW_SECONDS = LEASE_SECONDS / 3  # a training holder renews this often (a background thread)
# what `acquire` answers
GRANTED, HELD, PUBLISHED = "granted", "held", "published"


class Lease(NamedTuple):
    owner: str
    node_id: str
    renewed: float  # the service's clock


class RayAliveNodes:
    """The ids of the cluster's live nodes, asked of Ray at most once per `ttl` seconds (every
    waiter's poll would otherwise ask the GCS for the whole node table)."""

    def __init__(self, ttl: float = 1.0):
        self.ttl, self.asked, self.nodes = ttl, -float("inf"), set()

    def __call__(self) -> set[str]:
        if time.monotonic() - self.asked > self.ttl:
            self.nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            self.asked = time.monotonic()
        return self.nodes


class LeaseTable:
    """Who trains which stage-1 key of one store, and which keys are published: the lease
    service's logic without Ray (`Stage1Leases` runs it as an actor). One clock, the service's.

        table = LeaseTable(clock=time.monotonic, alive_nodes=lambda: {"node-1"})
        table.acquire("key", "sweep/t1", "node-1")  # "granted"; another owner now gets "held"
        table.publish("key")                        # and now everyone gets "published"
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 alive_nodes: Callable[[], set[str]] | None = None,
                 lease_seconds: float = LEASE_SECONDS):
        self._clock, self._lease_seconds = clock, lease_seconds
        self._alive_nodes = alive_nodes if alive_nodes is not None else RayAliveNodes()
        self.leases: dict[str, Lease] = {}
        self.published: set[str] = set()

    def acquire(self, key: str, owner: str, node_id: str) -> str:
        """PUBLISHED, GRANTED (to `owner`, now the holder) or HELD (by another owner)."""
        if key in self.published:
            return PUBLISHED
        holder = self.leases.get(key)
        now = self._clock()
        if (holder is None or holder.owner == owner or now - holder.renewed > self._lease_seconds
                or holder.node_id not in self._alive_nodes()):
            self.leases[key] = Lease(owner, node_id, now)
            return GRANTED
        return HELD

    def renew(self, key: str, owner: str, node_id: str) -> bool:
        """Hold on to the lease (taking it back if the service restarted empty); False once
        another owner took it over or the key is published."""
        return self.acquire(key, owner, node_id) == GRANTED

    def release(self, key: str, owner: str) -> None:
        if key in self.leases and self.leases[key].owner == owner:
            del self.leases[key]

    def publish(self, key: str) -> None:
        """The key's artifact is written: every later `acquire` answers PUBLISHED."""
        self.published.add(key)
        self.leases.pop(key, None)

    def taken(self, keys: list[str]) -> list[bool]:
        """For each key: published, or held by a live holder (one asking now would wait)."""
        now, alive = self._clock(), self._alive_nodes()
        return [key in self.published or (
                    (lease := self.leases.get(key)) is not None
                    and now - lease.renewed <= self._lease_seconds and lease.node_id in alive)
                for key in keys]


Stage1Leases = ray.remote(num_cpus=0)(LeaseTable)  # the lease service: LeaseTable as an actor
NAMESPACE = "cmg-sweep"  # the drivers' Ray namespace, where the lease services are found
HEAD_NODE = "node:__internal_head__"  # a resource only the head node has


def leases_name(store_uri: str) -> str:
    """The lease service's actor name for a stage-1 store: the same from every driver and node."""
    where = store_uri if is_uri(store_uri) else str(Path(store_uri).expanduser().resolve())
    return "cmg_stage1_leases_" + hashlib.sha256(where.rstrip("/").encode()).hexdigest()[:16]


def create_leases(store_uri: str):
    """The store's lease service, started if no driver did yet: detached (it outlives the driver
    that started it, until the cluster stops) and on the head node, so that losing a worker
    node never loses the leases. Restarted if its process dies; it then starts empty, and the
    holders' next renewals take their leases back."""
    return Stage1Leases.options(name=leases_name(store_uri), namespace=NAMESPACE,
                                get_if_exists=True, lifetime="detached", max_restarts=-1,
                                resources={HEAD_NODE: 0.001}).remote()


def get_leases(store_uri: str):
    """The store's lease service (a driver started it with `create_leases`)."""
    return ray.get_actor(leases_name(store_uri), namespace=NAMESPACE)


def node_id() -> str:
    """This process's Ray node id ("local" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
