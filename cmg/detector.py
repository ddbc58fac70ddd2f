"""The exported CMG detector: frozen classifier + selected stage-2 head + threshold, for new images.

    from cmg.detector import Detector
    detector = Detector.load("exported/partition-1", device="cpu")
    table = detector.score(images)   # uint8 (N, C, H, W) or (N, H, W), tensor or numpy array
    table[["pred_class", "pred_name", "cmg", "is_ood", "msp", "energy"]]

A detector folder (written by `python -m tune.export`, through `write_detector`) holds:

    detector.json   format and version, setting, partition, IND class ids and names, mode, the
                    full configuration, the input (shape, uint8, scaling), the CMG threshold at
                    95% IND true-positive rate on the validation images, and the trial's metrics
    classifier.pt   the frozen stage-1 classifier (a cmg checkpoint), or with a backbone:
    backbone.pt     a copy of the backbone file this partition's trial used (detector.json names it
                    relative to the folder, with its sha256), so the folder travels alone
    head.pt         the stage-2 head selected on validation (a state dict)
    README.md       how to load and use it

Nothing it loads lies outside the folder (the paths in detector.json's `source` and
`backbone.sweep` are records of where it came from): copy or move it anywhere, to any machine.
Everything loads with `torch.load(weights_only=True)`. `is_ood` is `cmg > threshold`; every score
is "higher = more OOD"; `pred_class` is the original class id of the most likely IND class
(from the stage-2 head's K IND logits). The baselines come from the stage-1 head, as in a sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmg.backbone import file_sha256, load_backbone
from cmg.config import RunConfig
from cmg.errors import _umask, fail
from cmg.metrics import SCORES, cmg_score
from cmg.models import ind_logits
from cmg.score_table import selected_head
from cmg.stage1 import load_stage1_model
from cmg.stage2 import _frozen, extract_features

FORMAT = "cmg-detector"
VERSION = 1
META, CLASSIFIER, BACKBONE, HEAD = "detector.json", "classifier.pt", "backbone.pt", "head.pt"
SCALING = "uint8 pixels divided by 255 (no mean/std; a backbone normalises inside its model)"


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """detector.json of a detector folder, checked to be one this version of cmg reads."""
    path = Path(folder) / META
    if not path.is_file():
        fail(f"{folder} is not a detector folder (no {META}); export one with "
             "python -m tune.export EXPERIMENT --out DIR and pass DIR/partition-N")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        fail(f"{path} is unreadable ({err}); export the detector again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(f"{path} is not a cmg detector description; export the detector again")
    if meta.get("version") != VERSION:
        fail(f"{folder} is a detector of format version {meta.get('version')}, this cmg reads "
             f"version {VERSION}; export it again with this version (python -m tune.export)")
    return meta


def backbone_file(folder: Path, meta: dict[str, Any]) -> Path:
    """The detector's backbone file: `backbone.pt` in the folder. A detector exported before
    backbones were copied names the sweep's absolute path, which resolves to itself here; one
    whose path has `{partition}` in it has a hash over every partition's file that no single
    file can match, so it must be exported again."""
    path = meta["backbone"]["path"]
    if "{partition}" in path:
        fail(f"{folder} names its backbone as {path} (exported before detectors held their "
             "backbone); export it again with python -m tune.export, which copies it in")
    return folder / path


class Detector:
    """A loaded detector; `score` runs it on images in batches on its device."""

    def __init__(self, meta: dict[str, Any], classifier: torch.nn.Module,
                 head: torch.nn.Module, device: torch.device):
        self.meta, self.classifier, self.head, self.device = meta, classifier, head, device
        self.num_classes = len(meta["ind_classes"])
        self.config = RunConfig.from_dict(meta["config"])

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "Detector":
        folder, device = Path(folder), torch.device(device)
        meta = read_meta(folder)
        k = len(meta["ind_classes"])
        if meta.get("backbone"):
            b = meta["backbone"]
            path = backbone_file(folder, meta)
            if not path.is_file() or file_sha256(path) != b["sha256"]:
                fail(f"backbone {path} is missing or is not the file this detector was trained "
                     f"with (sha256 {b['sha256'][:12]}...); export the detector again")
            classifier = load_backbone(path, b["format"], k, meta["family"],
                                       meta["config"]["classifier"]["head_width"], device)
        else:
            classifier = load_stage1_model(folder / CLASSIFIER, "classifier", device=device)
        try:
            head_state = torch.load(folder / HEAD, map_location=device, weights_only=True)
            head = selected_head(classifier, head_state)
        except (OSError, RuntimeError) as err:
            fail(f"{folder / HEAD} is missing or does not fit the classifier "
                 f"({str(err).splitlines()[0][:120]}); export the detector again")
        _frozen(classifier)
        return cls(meta, classifier, head.to(device), device)

    def check(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`images` as a uint8 (N, C, H, W) tensor of this detector's input shape, else a
        UsageError naming the difference."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[:, None]
        shape = tuple(self.meta["input"]["shape"])
        if x.dtype != torch.uint8:
            fail(f"images are {x.dtype}, the detector needs uint8 pixels 0..255")
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            got = "x".join(map(str, x.shape[1:])) if x.ndim == 4 else f"{x.ndim}-d"
            fail(f"images are {got} (channels x height x width), this detector needs "
                 f"{'x'.join(map(str, shape))}; resize or convert them")
        if len(x) == 0:
            fail("no images to score")
        return x

    @torch.no_grad()
    def score(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> pd.DataFrame:
        """One row per image: pred_class, pred_name, cmg, is_ood, and every baseline score."""
        x = self.check(images)
        k, amp = self.num_classes, self.config.classifier.amp
        parts: dict[str, list[torch.Tensor]] = {"pred": [], "cmg": [],
                                                **{name: [] for name in SCORES}}
        for start in range(0, len(x), batch_size):
            feats = extract_features(self.classifier, x[start:start + batch_size].to(self.device),
                                     amp)
            logits, stage1 = self.head(feats), self.classifier.head(feats)
            parts["pred"].append(ind_logits(logits, k).argmax(dim=1))
            parts["cmg"].append(cmg_score(logits, k, self.meta["mode"]))
            for name, fn in SCORES.items():
                parts[name].append(fn(stage1, k))
        values = {name: torch.cat(v).cpu().numpy() for name, v in parts.items()}
        ids, names = np.asarray(self.meta["ind_classes"]), np.asarray(self.meta["ind_class_names"])
        return pd.DataFrame({"pred_class": ids[values["pred"]], "pred_name": names[values["pred"]],
                             "cmg": values["cmg"],
                             "is_ood": values["cmg"] > self.meta["threshold"],
                             **{name: values[name] for name in SCORES}})


def readme_text(meta: dict[str, Any]) -> str:
    return (f"# CMG detector: {meta['setting']} partition {meta['partition']}\n\n"
            f"IND classes {meta['ind_class_names']}; mode {meta['mode']}; input "
            f"{'x'.join(map(str, meta['input']['shape']))} uint8; threshold "
            f"{meta['threshold']:.6g} (95% of the validation IND images score at or below it).\n\n"
            "Load it with `from cmg.detector import Detector; Detector.load(THIS_FOLDER)"
            ".score(images)` (images: uint8 pixels 0..255, N x C x H x W), or score files with "
            "`python -m cmg.score THIS_FOLDER INPUT --out scores.csv`. This folder is the whole "
            "detector: copy it anywhere the `cmg` package is installed (cmg-sweep's "
            "docs/detectors.md, \"Using a detector in your project\").\n")


def write_detector(folder: str | os.PathLike, meta: dict[str, Any],
                   head_state: dict[str, torch.Tensor], classifier_state: dict[str, Any] | None,
                   backbone: bytes | None = None) -> Path:
    """Write a detector folder all at once (built beside it, then renamed into place);
    `classifier_state` is a stage-1 classifier checkpoint's content, or with a backbone None and
    `backbone` the backbone file's bytes (meta["backbone"]["path"] is then BACKBONE)."""
    folder = Path(folder)
    if folder.exists():
        fail(f"{folder} exists; choose another --out or delete it")
    meta = {"format": FORMAT, "version": VERSION, **meta}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        torch.save(head_state, tmp / HEAD)
        if classifier_state is not None:
            torch.save(classifier_state, tmp / CLASSIFIER)
        if backbone is not None:
            (tmp / BACKBONE).write_bytes(backbone)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(readme_text(meta))
        tmp.chmod(0o777 & ~_umask())
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
