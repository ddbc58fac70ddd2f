"""Train-once-per-key stage 1: get a stage-1 artifact from the store, training it if missing.

Exactly one trial trains a given key at a time, across every sweep and driver on the cluster: a
lease from the store's lease service (tune/leases.py: one detached actor per stage-1 store on the
head node, named after the store, so it outlives any one driver) decides who trains; the others
wait. The service knows which keys are published (the holder calls `publish(key)` once the
artifact is written), so a waiter whose file system still shows "meta.json missing" (an NFS
negative-lookup cache) is told "published" instead of training the key again. A lease is free
again when its holder's node is gone (a lost spot worker) or when it was not renewed for
`LEASE_SECONDS`: the holder renews every `RENEW_SECONDS` from a background thread while it
trains, so a holder killed on a live node frees its key within `LEASE_SECONDS` (15 s; a holder
that hangs but lives keeps it). The next trial, or the holder's own retry, takes over and resumes
from the per-epoch checkpoints under ``KEY/partial/`` on the shared store (``partial/owner.json``
names who trains it, and the artifact's ``meta.json`` records the epochs a resumed training
started from).

Leases are per Ray cluster; the store may be shared by several (two clusters, or a laptop, on
one `s3://` prefix). So publishing checks twice: the holder asks the service once more that the
lease is still its own (a lease taken during the last epoch publishes nothing), then claims the
key in the store (`KEY/publisher.json`, `ArtifactStore.write_new`: atomic on a local folder, a
check-then-write on an object store) and writes the model only if the claim is its own. A second
publisher of the key is refused (logged under `KEY/refused/`), discards its model and loads the
published one. A claim whose claimant died between claim and `meta.json` is taken over: at once
in the same Ray session (the lease says the claimant lost it) or when its process ran on this
machine and is gone (an interrupted local sweep, resumed), else after CLAIM_SECONDS.
`meta.json` records each model file's sha256, and a node's cached download is checked against it.

    shared = SharedStage1(store, get_leases(store.uri), owner=trial_id, backbone=None)
    models = shared.ensure(split, cfg, device)  # the classifier's key, then the CVAE's
    models.classifier, models.cvae, models.features, models.trained
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from cmg.backbone import BackboneSpec
from cmg.checkpoint import load_checkpoint
from cmg.config import RunConfig
from cmg.data import Split
from cmg.stage1 import load_stage1_model, train_model
from cmg.stage2 import FrozenFeatures, freeze_features
from tune.artifacts import (KINDS, PUBLISHER_FILE, ArtifactStore, Stage1Keys, features_name,
                            stage1_keys)
from tune.leases import GRANTED, PUBLISHED, RENEW_SECONDS, node_id

VISIBLE_SECONDS = 300.0  # how long a published key may stay invisible in the store (NFS caches)
CLAIM_SECONDS = 600.0  # a publisher's claim this old without meta.json: it died mid-publish
CACHE = Path(os.environ.get("CMG_CACHE", Path.home() / ".cache" / "cmg-sweep"))

def session_name() -> str:
    """This Ray cluster's session (one per `ray start --head`; outside Ray, this process): who
    claims a key in the store, so that another cluster's claim is told apart."""
    if ray.is_initialized():
        return ray.get_runtime_context().get_session_name()
    return f"no-ray/{socket.gethostname()}/{os.getpid()}"


class LeaseLost(RuntimeError):
    """Another owner took over this holder's lease: its renewals stopped reaching the service."""


class PublishRefused(RuntimeError):
    """Another publisher (another Ray cluster, or a laptop, on the same store) claimed the key
    first: this training is discarded and the published model is used."""


class Heartbeat:
    """Renews a held lease every `every` seconds from a background thread while its holder
    trains; `check()` (after each epoch) raises LeaseLost once a renewal was refused.

        with Heartbeat(leases, key, owner) as heartbeat:
            train(heartbeat.check)
    """

    def __init__(self, leases, key: str, owner: str, every: float = RENEW_SECONDS):
        self.leases, self.key, self.owner, self.every = leases, key, owner, every
        self.stop, self.lost = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{key}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                held = ray.get(self.leases.renew.remote(self.key, self.owner, node_id()),
                               timeout=self.every)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue  # a slow or restarting service: the next renewal may come in time
            if not held:
                self.lost.set()
                return

    def check(self, now: bool = False) -> None:
        """Raise LeaseLost if a renewal was refused; `now`: ask the service itself (before
        publishing: the last renewal may be seconds old)."""
        if now and not self.lost.is_set() and not ray.get(
                self.leases.renew.remote(self.key, self.owner, node_id())):
            self.lost.set()
        if self.lost.is_set():
            raise LeaseLost(f"another owner took over stage-1 key {self.key} from {self.owner}")


def _no_lease(now: bool = False) -> None:
    """`train`'s check without a lease service: no other trainer to lose the key to."""


def train_once(leases, key: str, owner: str, published: Callable[[], bool],
               train: Callable[[Callable[..., None]], None], poll_seconds: float = 1.0,
               renew_seconds: float = RENEW_SECONDS) -> bool:
    """Run `train(check)` for `key` unless it is published, with one trainer at a time under
    `leases` (None: no other trainer): wait while another owner holds the key, take over once
    that holder is gone, return once the key is published. `train` writes the artifact and calls
    `check()` after each epoch and `check(now=True)` before it publishes (each raises LeaseLost
    if another owner took over, and this call goes back to waiting); PublishRefused from `train`
    (another cluster published the key) waits for that artifact instead. `published()` looks in
    the store. True if this call trained and published the key.

        trained = train_once(leases, key, "sweep/t1", lambda: store.exists(key), train)
    """
    if leases is None:
        if published():
            return False
        try:
            train(_no_lease)
        except PublishRefused as refused:
            return _refused(refused, key, published, poll_seconds)
        return True
    while not published():
        answer = ray.get(leases.acquire.remote(key, owner, node_id()))
        if answer == PUBLISHED:  # written, if not yet visible here
            _await_visible(key, published, poll_seconds)
            return False
        if answer == GRANTED:
            try:
                with Heartbeat(leases, key, owner, renew_seconds) as heartbeat:
                    fresh = not published()  # else published before the service knew it
                    if fresh:
                        train(heartbeat.check)
            except LeaseLost:
                continue
            except PublishRefused as refused:
                fresh = _refused(refused, key, published, poll_seconds)
            except BaseException:
                ray.get(leases.release.remote(key, owner))
                raise
            ray.get(leases.publish.remote(key))
            return fresh
        time.sleep(poll_seconds)
    return False


def _refused(refused: PublishRefused, key: str, published: Callable[[], bool],
             poll_seconds: float) -> bool:
    print(f"[stage 1] {refused}", file=sys.stderr, flush=True)
    _await_visible(key, published, poll_seconds)
    return False


def _await_visible(key: str, published: Callable[[], bool], poll_seconds: float) -> None:
    deadline = time.monotonic() + VISIBLE_SECONDS
    while not published():
        if time.monotonic() > deadline:
            raise RuntimeError(f"stage-1 key {key} is published but not in the store after "
                               f"{VISIBLE_SECONDS:.0f} s: was it deleted? Restart the Ray cluster "
                               "to forget it")
        time.sleep(poll_seconds)


@dataclass
class Stage1Models:
    keys: Stage1Keys
    classifier: torch.nn.Module
    cvae: torch.nn.Module
    features: FrozenFeatures
    trained: int = 0  # how many of the two models this call trained (0: both reused)
    train_seconds: float = 0.0  # time spent training and publishing them here


# Models loaded in this worker process, most recent last: trial processes are reused, and stage 2
# never modifies the frozen models or features, so the next trial skips the reload.
_LOADED: OrderedDict[tuple[str, ...], Any] = OrderedDict()  # (uri, key, [features file,] device)
_LOADED_MAX = 15  # a classifier and two CVAEs per partition


def _cached(slot: tuple[str, ...], load: Callable[[], Any]) -> Any:
    if slot not in _LOADED:
        _LOADED[slot] = load()
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(slot)
    return _LOADED[slot]


def _features(split: Split, cfg: RunConfig,
              classifier: torch.nn.Module) -> tuple[FrozenFeatures, bytes]:
    """The frozen network's features for the split's OOD-set layout, and their file's bytes."""
    features = freeze_features(classifier, split, cfg.classifier.amp)
    buffer = io.BytesIO()
    torch.save({"train": features.train.cpu(), "baselines": features.baselines,
                "evals": {p: {k: v.cpu() for k, v in d.items()}
                          for p, d in features.evals.items()},
                "stage1_logits": {p: tuple(x.cpu() for x in pair)
                                  for p, pair in features.stage1_logits.items()}}, buffer)
    return features, buffer.getvalue()


def _backbone(backbone: BackboneSpec, split: Split, cfg: RunConfig, device: torch.device,
              path: Path | None = None):
    return backbone.load(split.num_classes, split.family, cfg.classifier.head_width, device, path,
                         trained_for=(split.setting, split.partition, split.data))


def _fetch(store: ArtifactStore, key: str, name: str) -> Path:
    """A local copy of a published file, checked against the digest its meta.json records."""
    digest = store.read_json(key).get("digests", {}).get(name)  # None: published before digests
    return store.get_file(key, name, CACHE / "stage1" / key / name, digest)


def _load(store: ArtifactStore, keys: Stage1Keys, split: Split, cfg: RunConfig,
          device: torch.device, backbone: BackboneSpec | None) -> tuple:
    """(classifier, cvae, features) of the published keys, from this process's cache if loaded."""
    def classifier_and_features():
        # the key holds the data config: models stored before checkpoints recorded it load
        classifier = (load_stage1_model(_fetch(store, keys.classifier, "classifier.pt"),
                                        "classifier", split, device, require_data=False)
                      if backbone is None else
                      _backbone(backbone, split, cfg, device,
                                _fetch(store, keys.classifier, "backbone.pt")))
        if store.exists(keys.classifier, features_file):
            raw = torch.load(_fetch(store, keys.classifier, features_file), map_location=device,
                             weights_only=True)
            features = FrozenFeatures(train=raw["train"], evals=raw["evals"],
                                      baselines=raw["baselines"],
                                      stage1_logits=raw.get("stage1_logits"))
        else:  # another set of OOD data than the classifier was trained beside: no retraining
            features, data = _features(split, cfg, classifier)
            store.write_new(keys.classifier, features_file, data)  # the first one stays
        return classifier, features

    features_file = features_name(split)
    classifier, features = _cached((store.uri, keys.classifier, features_file, str(device)),
                                   classifier_and_features)
    cvae = _cached((store.uri, keys.cvae, str(device)), lambda: load_stage1_model(
        _fetch(store, keys.cvae, "cvae.pt"), "cvae", split, device, require_data=False))
    return classifier, cvae, features


@dataclass(frozen=True)
class SharedStage1:
    """A sweep's stage-1 models on a shared store, and who trains a missing one: `owner` (its
    lease holder, recorded as `trained_by`), under `leases` (None: no other trainer), with a
    `backbone` as the classifier (then only the CVAE trains) and `compile_model` (torch.compile
    the training steps; not part of the key: the same models either way).

        models = SharedStage1(store, leases, owner="sweep/trial_1").ensure(split, cfg, device)
        SharedStage1(store, leases, owner="sweep/prewarm").ensure_one("cvae", split, cfg, device)
    """

    store: ArtifactStore
    leases: Any = None  # the store's Stage1Leases actor handle (`get_leases`)
    owner: str = "local"
    backbone: BackboneSpec | None = None
    compile_model: bool = False
    poll_seconds: float = 1.0  # how often a waiting trial asks for the lease
    renew_seconds: float = RENEW_SECONDS  # how often a training trial renews it

    def ensure(self, split: Split, cfg: RunConfig, device: torch.device) -> Stage1Models:
        """Load the stage-1 models of (split, cfg), training first each that no one has (the
        classifier, then the CVAE)."""
        keys = stage1_keys(split.setting, split.partition, cfg, self.backbone)
        trained, seconds = 0, 0.0
        for kind in KINDS:
            fresh, spent = self.ensure_one(kind, split, cfg, device, getattr(keys, kind))
            trained, seconds = trained + fresh, seconds + spent
        return Stage1Models(keys, *_load(self.store, keys, split, cfg, device, self.backbone),
                            trained, seconds)

    def ensure_one(self, kind: str, split: Split, cfg: RunConfig, device: torch.device,
                   key: str | None = None) -> tuple[bool, float]:
        """Publish the `kind` model of (split, cfg) unless it is: (trained here, seconds spent).
        `key`: its key, if the caller has it."""
        key = key or getattr(stage1_keys(split.setting, split.partition, cfg, self.backbone),
                             kind)
        seconds = 0.0

        def train(check: Callable[..., None]) -> None:
            nonlocal seconds
            seconds = self._train_and_publish(kind, key, split, cfg, device, check)

        trained = train_once(self.leases, key, self.owner, lambda: self.store.exists(key), train,
                             self.poll_seconds, self.renew_seconds)
        return trained, seconds

    def _train_and_publish(self, kind: str, key: str, split: Split, cfg: RunConfig,
                           device: torch.device, check: Callable[..., None]) -> float:
        """Train the model (resuming from KEY/partial/), publish its artifact; return seconds.
        With a backbone the classifier's artifact is the backbone file (published, so any node
        can load it) and its features: nothing trains. Publishes only while the lease is still
        this owner's and the key's claim is (`_claim`)."""
        store, backbone = self.store, self.backbone
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="cmg-stage1-") as tmp:
            local = Path(tmp) / f"{kind}.pt"
            resumed_from = {}
            if store.exists(key, f"partial/{kind}.pt"):
                local.write_bytes(store.read_bytes(key, f"partial/{kind}.pt"))
                resumed_from[kind] = int(load_checkpoint(local, kind)["epoch"])
            record = {"owner": self.owner, "node_id": node_id(), "resumed_from": resumed_from}
            store.write_json(key, "partial/owner.json", record)
            store.log_training(key, record)

            def after_epoch(epoch: int, metrics: dict) -> None:
                store.put_file(key, f"partial/{kind}.pt", local)  # any node resumes from here
                check()  # stop here if another owner took the lease over

            history = []
            if kind == "classifier" and backbone is not None:
                model, name = _backbone(backbone, split, cfg, device), "backbone.pt"
                local = Path(backbone.file(split.partition))
            else:
                model, history = train_model(kind, split, cfg, device, local, after_epoch,
                                             quiet=True, compile_model=self.compile_model)
                name = f"{kind}.pt"
            files = {name: local.read_bytes()}
            if kind == "classifier":
                files[features_name(split)] = _features(split, cfg, model)[1]
            digests = {file: hashlib.sha256(data).hexdigest() for file, data in files.items()}
            check(now=True)  # a lease taken over during the last epoch: publish nothing
            claim = self._claim(key, kind, digests)
            for file, data in files.items():
                store.write_bytes(key, file, data)
            if store.read_json(key, PUBLISHER_FILE)["claim"] != claim:  # taken over meanwhile
                raise LeaseLost(f"another owner claimed stage-1 key {key} while {self.owner} "
                                "wrote it")
            store.write_json(key, "meta.json", {
                "key": key, "kind": kind, "setting": split.setting, "partition": split.partition,
                "config": {section: cfg.to_dict()[section] for section in (kind, "data")},
                "history": history, "seconds": round(time.time() - started, 3),
                "device": str(device), "resumed_from": resumed_from, "node_id": node_id(),
                "trained_by": self.owner, "compiled": self.compile_model, "digests": digests,
                **({"backbone": backbone.identity()} if backbone and kind == "classifier"
                   else {})})
            store.delete(key, f"partial/{kind}.pt")  # superseded: it only doubled the store's size
        return time.time() - started

    def _claim(self, key: str, kind: str, digests: dict[str, str]) -> str:
        """Claim KEY in the store for this owner, or raise PublishRefused; returns the claim's
        id. The first claim stays (`write_new`). A claim of this same Ray session is taken over
        (the lease service just confirmed this owner holds the lease, so its claimant lost it;
        outside Ray the session is this process). Another session's claim is another cluster (or
        a laptop, or an earlier run of this sweep) publishing the key: wait for its `meta.json`
        and refuse, or take the claim over if its publisher died mid-publish (an interrupted
        sweep that is resumed): at once if it ran on this machine, else once the claim is
        CLAIM_SECONDS old."""
        store = self.store
        mine = {"claim": uuid.uuid4().hex, "owner": self.owner, "session": session_name(),
                "node_id": node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "time": time.time(), "digests": digests}
        if store.write_new(key, PUBLISHER_FILE, json.dumps(mine).encode()):
            return mine["claim"]
        while (holder := store.read_json(key, PUBLISHER_FILE))["session"] != mine["session"]:
            if store.exists(key):
                store.write_json(key, f"refused/{time.time_ns()}-{mine['claim'][:8]}.json",
                                 {**mine, "claimed_by": holder})
                store.delete(key, f"partial/{kind}.pt")  # the claimant's model supersedes it
                raise PublishRefused(
                    f"stage-1 key {key} is published by {holder['owner']} of another Ray "
                    f"session ({holder['session']}) on this store: {self.owner}'s training is "
                    "discarded and that model used")
            if time.time() - holder["time"] > CLAIM_SECONDS or _gone(holder):
                print(f"[stage 1] taking over stage-1 key {key}: {holder['owner']} of Ray "
                      f"session {holder['session']} claimed it {time.time() - holder['time']:.0f}"
                      " s ago and never published it", file=sys.stderr, flush=True)
                break
            time.sleep(self.poll_seconds)
        store.write_json(key, PUBLISHER_FILE, mine)
        return mine["claim"]


def _gone(claim: dict) -> bool:
    """Whether a claim's publisher ran on this machine and its process is gone."""
    if claim.get("host") != socket.gethostname():
        return False
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
