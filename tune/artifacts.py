"""Content-addressed store of stage-1 artifacts, on a local path or any pyarrow filesystem URI.

A partition's stage 1 is two artifacts, each under its own key: the classifier's (its checkpoint,
the frozen network's features of the train/val/test images and the baselines' metrics) and the
CVAE's. A key hashes what determines its model and a format version, so every trial and every
later sweep that needs the same model finds it, and a new latent size trains only a CVAE::

    store = ArtifactStore("s3://bucket/cmg/stage1")      # or a local folder
    keys = stage1_keys("same_dataset_mnist", 1, cfg)     # keys.classifier, keys.cvae
    store.exists(keys.cvae)                              # True once its `meta.json` is written

Layout: ``ROOT/CLASSIFIER_KEY/{classifier.pt or backbone.pt, features.pt, meta.json}`` and
``ROOT/CVAE_KEY/{cvae.pt, meta.json}``; `meta.json` is written last and marks an artifact
complete; ``ROOT/format.json`` names the store's format. The features depend on which OOD sets
are evaluated (different_dataset) and on what validation OOD is (`--select-on`), the models do
not: another layout has its own ``features-<layout hash>.pt`` (`features_name`), computed from the
stored classifier by the first trial that needs it, so neither ever retrains stage 1.
``ROOT/KEY/partial/`` holds the per-epoch checkpoint of a training in progress, so a trial that
moves to another node continues from its last epoch; publishing deletes it (the published model
supersedes it). ``ROOT/KEY/trainings/`` logs every training of the key that started (one file
each, `ArtifactStore.trainings`): one entry per key unless a training was interrupted and
resumed. Every file is written to a temporary name and moved into place.

Publishing never overwrites: the publisher first claims the key (``KEY/publisher.json``, written
with `write_new`), and only the claimant writes the model and `meta.json`, which records each
model file's sha256 (`digests`), so a node's cached copy is checked against what was published.
A publish that finds another claim (another Ray cluster, or a laptop, on the same store) is
refused and logged under ``KEY/refused/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from pyarrow import fs as pafs

from cmg.backbone import BackboneSpec
from cmg.config import RunConfig
from cmg.errors import fail
from cmg.results import open_storage
from cmg.stage1 import data_identity

FORMAT_VERSION = 2  # 2: the classifier and the CVAE under separate keys; 1: one key for both
FORMAT_FILE = "format.json"  # at the store's root: the format its artifacts are written in
PUBLISHER_FILE = "publisher.json"  # in KEY/: who publishes the key (written once, first)
KINDS = ("classifier", "cvae")


class Stage1Keys(NamedTuple):
    """A partition's two stage-1 artifacts: the classifier's (with its frozen features) and the
    CVAE's. A trial row records them as one string, "CLASSIFIER_KEY+CVAE_KEY"."""

    classifier: str
    cvae: str

    def __str__(self) -> str:
        return f"{self.classifier}+{self.cvae}"

    @classmethod
    def parse(cls, text: str) -> "Stage1Keys":
        """The keys of a row's `stage1_key` (format 1's single key names both)."""
        classifier, _, cvae = text.partition("+")
        return cls(classifier, cvae or classifier)


def _key(setting: str, partition: int, kind: str, identity: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "setting": setting, "partition": partition,
                       "kind": kind, **identity}, sort_keys=True).encode()
    return f"{setting}-p{partition}-{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"


def classifier_key(setting: str, partition: int, cfg: RunConfig,
                   backbone: BackboneSpec | None = None) -> str:
    """Hash of what determines the classifier and its features: its config (with an external
    backbone: the backbone's format and file hash, and the head width) and the data config (the
    features cover the evaluation images, so `eval_limit` counts; `val_ood` names a features
    file instead: `features_name`)."""
    model = cfg.to_dict()["classifier"]
    if backbone is not None:
        model = {"backbone": backbone.identity(), "head_width": cfg.classifier.head_width}
    # what validation OOD is changes the features, not the classifier: another features file
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k != "val_ood"}
    return _key(setting, partition, "classifier", {"classifier": model, "data": data})


def cvae_key(setting: str, partition: int, cfg: RunConfig) -> str:
    """Hash of what determines the CVAE: its config and the training images (not the classifier:
    a new latent size trains only a CVAE)."""
    return _key(setting, partition, "cvae", {"cvae": cfg.to_dict()["cvae"],
                                             "data": data_identity("cvae", cfg.data)})


def stage1_keys(setting: str, partition: int, cfg: RunConfig,
                backbone: BackboneSpec | None = None) -> Stage1Keys:
    """The keys of a partition's stage-1 artifacts (not the device, not stage 2, not the OOD
    sets evaluated)."""
    return Stage1Keys(classifier_key(setting, partition, cfg, backbone),
                      cvae_key(setting, partition, cfg))


def features_name(split) -> str:
    """The classifier artifact's features file for a split's evaluation layout: its OOD sets
    (`Split.ood_sets`, Setting 2) and what validation OOD is (`DataConfig.val_ood`); one file
    per layout beside the same classifier."""
    if not split.ood_sets and split.data.val_ood == "unseen":
        return "features.pt"
    # "by-name": each set's val/test split is seeded by its name (earlier: by its list position)
    layout = ["by-name", [list(entry) for entry in split.ood_sets]]
    if split.data.val_ood != "unseen":
        layout.append(split.data.val_ood)
    return f"features-{hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:12]}.pt"


def put_bytes(filesystem: pafs.FileSystem, target: str, data: bytes) -> None:
    """Write `data` to `target` on a pyarrow filesystem atomically (a temporary name, a move)."""
    filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, target)


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file, as `meta.json`'s `digests` record it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    return open_storage(uri)


class ArtifactStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = _open(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.root, key, name) if p)

    def exists(self, key: str, name: str = "meta.json") -> bool:
        return self.fs.get_file_info(self.path(key, name)).type == pafs.FileType.File

    def write_bytes(self, key: str, name: str, data: bytes) -> None:
        put_bytes(self.fs, self.path(key, name), data)

    def write_new(self, key: str, name: str, data: bytes) -> bool:
        """Write KEY/NAME unless it exists; False (nothing written) if it does. On a local folder
        the check and the write are one atomic step (a hard link of a temporary file fails if
        the name exists, on any POSIX file system, NFS included). pyarrow's object stores
        (s3://, gs://) have no conditional write: there it is a check, then an atomic write, and
        two writers within the same few milliseconds can both write (the later one wins, and
        read-after-write consistency shows every reader that one); read the file back to see
        whose it is."""
        if not self.is_local:
            if self.exists(key, name):
                return False
            self.write_bytes(key, name, data)
            return True
        target = Path(self.path(key, name))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read_bytes(self, key: str, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(key, name)) as f:
            return f.read()

    def delete(self, key: str, name: str) -> None:
        """Remove KEY/NAME if it is there."""
        if self.exists(key, name):
            self.fs.delete_file(self.path(key, name))

    def put_file(self, key: str, name: str, local: str | os.PathLike) -> None:
        self.write_bytes(key, name, Path(local).read_bytes())

    def get_file(self, key: str, name: str, local: str | os.PathLike,
                 digest: str | None = None) -> Path:
        """A local path to the file: the file itself on a local store, else a cached download.
        With `digest` (its sha256 in `meta.json`), a cached copy that differs (the same key of
        another store, a copy from before the key was published) is downloaded again, and a
        download that differs is an error."""
        if self.is_local:
            return Path(self.path(key, name))
        local = Path(local)
        if local.exists() and digest and file_digest(local) != digest:
            local.unlink()
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(self.read_bytes(key, name))
            if digest and file_digest(tmp) != digest:
                tmp.unlink()
                raise RuntimeError(f"{self.path(key, name)} is not the file published as "
                                   f"{key} (sha256 {digest[:12]}...): it was changed after "
                                   "publishing; delete that key's folder to train it again")
            os.replace(tmp, local)
        return local

    def write_json(self, key: str, name: str, data: dict) -> None:
        self.write_bytes(key, name, json.dumps(data, indent=2).encode())

    def read_json(self, key: str, name: str = "meta.json") -> dict:
        return json.loads(self.read_bytes(key, name))

    def weights_id(self, keys: Stage1Keys) -> str | None:
        """The weights published under `keys`, as a trial row records them (`stage1_weights`,
        "CLASSIFIER+CVAE": 12 hex of a sha256 over each meta.json's `digests`). A key names a
        configuration; trained again, on another machine, its model may differ in the last bits,
        and so does this. None while either is unpublished or published before digests."""
        ids = []
        for key in dict.fromkeys(keys):  # format 1: one key names both
            digests = self.read_json(key).get("digests") if self.exists(key) else None
            if not digests:
                return None
            ids.append(hashlib.sha256(json.dumps(digests, sort_keys=True).encode())
                       .hexdigest()[:12])
        return "+".join(ids)

    def log_training(self, key: str, record: dict) -> None:
        """Add an entry to KEY's training log (a new file: no append, so any filesystem works)."""
        self.write_json(key, f"trainings/{time.time_ns()}-{uuid.uuid4().hex[:8]}.json", record)

    def trainings(self, key: str) -> list[dict]:
        """KEY's training log, oldest first: one record per training started on it."""
        selector = pafs.FileSelector(self.path(key, "trainings"), allow_not_found=True)
        names = sorted(info.base_name for info in self.fs.get_file_info(selector)
                       if info.base_name.endswith(".json"))
        return [self.read_json(key, f"trainings/{name}") for name in names]

    def check_format(self) -> None:
        """Mark a new store with this format; refuse, in one line, a store of another format."""
        if self.exists("", FORMAT_FILE):
            found = self.read_json("", FORMAT_FILE).get("format")
        elif self.keys():  # artifacts from before the format file: format 1
            found = 1
        else:
            self.write_json("", FORMAT_FILE, {"format": FORMAT_VERSION})
            return
        if found != FORMAT_VERSION:
            fail(f"stage-1 store {self.uri} holds format-{found} models and this version reads "
                 f"format {FORMAT_VERSION} (the classifier and the CVAE under separate keys); "
                 "delete that folder (its models train again) or pass another --storage")

    def keys(self) -> list[str]:
        """Keys of the complete artifacts."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory and self.exists(info.base_name))
