"""Train-once-per-key stage 1: get a stage-1 artifact from the store, training it if missing.

Exactly one trial trains a given key at a time: a lease from the `Stage1Leases` actor (one per
sweep, pinned to the driver's node) decides who trains; the others wait for the artifact. A lease
is free again when its holder's node is gone (a lost spot worker) or it stops renewing it; the
next trial, or the holder's own retry, takes over and resumes from the per-epoch checkpoints under
``KEY/partial/`` on the shared store (``partial/owner.json`` names who trains it, and the
artifact's ``meta.json`` records the epochs a resumed training started from).

    shared = SharedStage1(store, leases, owner=trial_id, backbone=None)
    models = shared.ensure(split, cfg, device)
    models.classifier, models.cvae, models.features, models.trained
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cmg.backbone import BackboneSpec
from cmg.checkpoint import load_checkpoint
from cmg.config import RunConfig
from cmg.data import Split
from cmg.stage1 import load_stage1_model, train_stage1
from cmg.stage2 import FrozenFeatures, freeze_features
from tune.artifacts import ArtifactStore, features_name, stage1_key

LEASE_SECONDS = 900.0  # a holder renews at every epoch; longer silence means it hangs
CACHE = Path(os.environ.get("CMG_CACHE", Path.home() / ".cache" / "cmg-sweep"))


@ray.remote(num_cpus=0)
class Stage1Leases:
    """Who is training which stage-1 key right now (lives as long as the sweep's driver)."""

    def __init__(self):
        self.leases: dict[str, tuple[str, str, float]] = {}  # key -> (owner, node id, renewed)

    def acquire(self, key: str, owner: str, node_id: str) -> bool:
        holder = self.leases.get(key)
        now = time.time()
        if (holder is None or holder[0] == owner or now - holder[2] > LEASE_SECONDS
                or holder[1] not in self._alive_nodes()):
            self.leases[key] = (owner, node_id, now)
            return True
        return False

    def renew(self, key: str, owner: str) -> None:
        holder = self.leases.get(key)
        if holder is not None and holder[0] == owner:
            self.leases[key] = (owner, holder[1], time.time())

    def release(self, key: str, owner: str) -> None:
        if self.leases.get(key, (None,))[0] == owner:
            del self.leases[key]

    @staticmethod
    def _alive_nodes() -> set[str]:
        return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


LEASES_NAME = "cmg_stage1_leases"
NAMESPACE = "cmg-sweep"  # the driver's Ray namespace, where the lease actor is found


def get_leases():
    """The sweep's lease actor (created by the driver with `create_leases`)."""
    return ray.get_actor(LEASES_NAME, namespace=NAMESPACE)


def create_leases():
    """Start the lease actor on the driver's own node (the head on a cluster), so that losing a
    worker node never loses the leases."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Stage1Leases.options(name=LEASES_NAME, namespace=NAMESPACE, get_if_exists=True,
                                scheduling_strategy=here).remote()


def node_id() -> str:
    """This process's Ray node id ("local" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


@dataclass
class Stage1Models:
    key: str
    classifier: torch.nn.Module
    cvae: torch.nn.Module
    features: FrozenFeatures
    trained: bool  # True if this call trained it, False if it was reused
    train_seconds: float = 0.0  # time spent training and publishing it here (0 if reused)


EpochReport = Callable[[str, int, dict], None]  # (model kind, epoch, metrics)


# Artifacts loaded in this worker process, most recent last: trial processes are reused, and
# stage 2 never modifies the frozen models or features, so the next trial skips the reload.
_LOADED: OrderedDict[tuple[str, str, str, str], tuple] = OrderedDict()  # uri, key, features, device
_LOADED_MAX = 5  # one per partition


def _publish_features(store: ArtifactStore, key: str, split: Split, cfg: RunConfig,
                      classifier: torch.nn.Module) -> FrozenFeatures:
    """Compute the frozen network's features for the split's OOD-set layout and store them.
    Two trials that do this at once write the same content; the last move wins."""
    features = freeze_features(classifier, split, cfg.classifier.amp)
    buffer = io.BytesIO()
    torch.save({"train": features.train.cpu(), "baselines": features.baselines,
                "evals": {p: {k: v.cpu() for k, v in d.items()}
                          for p, d in features.evals.items()},
                "stage1_logits": {p: tuple(x.cpu() for x in pair)
                                  for p, pair in features.stage1_logits.items()}}, buffer)
    store.write_bytes(key, features_name(split.ood_sets), buffer.getvalue())
    return features


def _backbone(backbone: BackboneSpec, split: Split, cfg: RunConfig, device: torch.device,
              path: Path | None = None):
    return backbone.load(split.num_classes, split.family, cfg.classifier.head_width, device, path,
                         trained_for=(split.setting, split.partition, split.data))


def _load(store: ArtifactStore, key: str, split: Split, cfg: RunConfig, device: torch.device,
          trained: bool, backbone: BackboneSpec | None) -> Stage1Models:
    features_file = features_name(split.ood_sets)
    slot = (store.uri, key, features_file, str(device))
    if slot not in _LOADED:
        cache = CACHE / "stage1" / key
        fetch = lambda name: store.get_file(key, name, cache / name)  # noqa: E731
        # the key holds the data config: models stored before checkpoints recorded it load
        classifier = (load_stage1_model(fetch("classifier.pt"), "classifier", split, device,
                                        require_data=False)
                      if backbone is None else
                      _backbone(backbone, split, cfg, device, fetch("backbone.pt")))
        models = [classifier, load_stage1_model(fetch("cvae.pt"), "cvae", split, device,
                                                require_data=False)]
        if store.exists(key, features_file):
            raw = torch.load(fetch(features_file), map_location=device, weights_only=True)
            features = FrozenFeatures(train=raw["train"], evals=raw["evals"],
                                      baselines=raw["baselines"],
                                      stage1_logits=raw.get("stage1_logits"))
        else:  # another set of OOD data than the models were trained beside: no retraining
            features = _publish_features(store, key, split, cfg, classifier)
        _LOADED[slot] = (*models, features)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(slot)
    return Stage1Models(key, *_LOADED[slot], trained)


@dataclass(frozen=True)
class SharedStage1:
    """A sweep's stage-1 models on a shared store, and who trains a missing one: `owner` (its
    lease holder, recorded as `trained_by`), under `leases` (None: no other trainer), with a
    `backbone` as the classifier (then only the CVAE trains) and `compile_model` (torch.compile
    the training steps; not part of the key: the same models either way).

        models = SharedStage1(store, leases, owner="sweep/trial_1").ensure(split, cfg, device)
    """

    store: ArtifactStore
    leases: Any = None  # a Stage1Leases actor handle
    owner: str = "local"
    backbone: BackboneSpec | None = None
    compile_model: bool = False
    poll_seconds: float = 1.0  # how often a waiting trial looks for the artifact

    def ensure(self, split: Split, cfg: RunConfig, device: torch.device,
               report: EpochReport | None = None) -> Stage1Models:
        """Load the stage-1 artifact of (split, cfg), training it first if no one has;
        `report(kind, epoch, metrics)` after each training epoch."""
        key = stage1_key(split.setting, split.partition, cfg, self.backbone)
        leases, trained, seconds = self.leases, False, 0.0
        while not self.store.exists(key):
            if leases is None or ray.get(leases.acquire.remote(key, self.owner, node_id())):
                renew = (lambda: leases.renew.remote(key, self.owner)) if leases is not None else (
                    lambda: None)
                try:
                    if not self.store.exists(key):  # else published while this one waited
                        seconds = self._train_and_publish(key, split, cfg, device, renew, report)
                        trained = True
                finally:
                    if leases is not None:
                        ray.get(leases.release.remote(key, self.owner))
                break
            time.sleep(self.poll_seconds)
        models = _load(self.store, key, split, cfg, device, trained, self.backbone)
        models.train_seconds = seconds
        return models

    def _train_and_publish(self, key: str, split: Split, cfg: RunConfig, device: torch.device,
                           renew: Callable[[], None], report: EpochReport | None) -> float:
        """Train both models (resuming from KEY/partial/), publish the artifact; return seconds.
        With a backbone only the CVAE trains, and the backbone file is published in the
        artifact (so any node can load it)."""
        store, backbone = self.store, self.backbone
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="cmg-stage1-") as tmp:
            local = {name: Path(tmp) / f"{name}.pt" for name in ("classifier", "cvae")}
            resumed_from = {}
            for name, path in local.items():
                if store.exists(key, f"partial/{name}.pt"):
                    path.write_bytes(store.read_bytes(key, f"partial/{name}.pt"))
                    resumed_from[name] = int(load_checkpoint(path, name)["epoch"])
            record = {"owner": self.owner, "node_id": node_id(), "resumed_from": resumed_from}
            store.write_json(key, "partial/owner.json", record)
            store.log_training(key, record)

            def on_epoch(kind):
                def callback(epoch, metrics):
                    store.put_file(key, f"partial/{kind}.pt", local[kind])  # any node resumes
                    renew()
                    if report is not None:
                        report(kind, epoch, metrics)
                return callback

            models = train_stage1(split, cfg, device, _backbone(backbone, split, cfg, device)
                                  if backbone is not None else None, local.get, on_epoch,
                                  quiet=True, compile_model=self.compile_model)
            if backbone is not None:
                local["classifier"] = Path(backbone.file(split.partition))
            _publish_features(store, key, split, cfg, models.classifier)
            for name, path in local.items():
                store.put_file(key, f"{'backbone' if backbone and name == 'classifier' else name}.pt",
                               path)
            store.write_json(key, "meta.json", {
                "key": key, "setting": split.setting, "partition": split.partition,
                "config": {k: v for k, v in cfg.to_dict().items() if k != "stage2"},
                "classifier_history": models.histories.get("classifier", []),
                "cvae_history": models.histories["cvae"],
                "seconds": round(time.time() - started, 3), "device": str(device),
                "resumed_from": resumed_from, "node_id": node_id(), "trained_by": self.owner,
                "compiled": self.compile_model,
                **({"backbone": backbone.identity()} if backbone else {})})
        return time.time() - started
