"""External feature extractors for CMG stage 2: your own pretrained model in place of stage 1's
classifier (the reference's "CSI+CMG").

    classifier = load_backbone("last.model", "csi", num_classes=10)
    run_stage2(classifier, cvae, split, cfg.stage2)      # fine-tunes classifier.head only

Formats (`--backbone-format`):
- `cmg`: a classifier checkpoint written by `python -m cmg.train`. It records the setting,
  partition and data split it was trained on, and loading it for another is a one-line error
  (it may have trained on the other split's validation images). Setting 1 has one model per
  partition: put `{partition}` in the path (`ckpt/classifier_p{partition}.pt`); a sweep over
  several partitions requires it.
- `csi`: the labelled CIFAR ResNet-18 of CSI (Tack et al., NeurIPS 2020) as `torch.save(model
  .state_dict())` writes it: stem `conv1`/`bn1`, `layer1..4` of BasicBlocks (`shortcut.0/1` for
  projections), `linear` (the class head), and its extra heads `simclr_layer`, `shift_cls_layer`,
  `joint_distribution_layer`, which stage 2 does not use and which are dropped. A `module.`
  prefix (DataParallel) is stripped. Inputs are normalised inside the model, (x - 0.5) / 0.5, as
  CSI's own `NormalizeLayer` does. The head is CSI's `linear` layer, extended by one zero row
  for the OOD class that CMG-softmax trains; its K class logits are exactly CSI's.
- `torchvision`: a `torchvision.models.resnet18` state dict (ImageNet-style stem, ImageNet
  mean/std normalisation inside the model). Its 1000-class `fc` does not fit the setting's
  classes, so the head is a new MLP head (`classifier.head_width` wide) trained from scratch in
  stage 2; the baselines (max-softmax, energy, max-logit) then score that untrained head, so
  compare with a `cmg` or `csi` backbone for meaningful baselines.

Loading is strict: any missing or unexpected key is a one-line error listing the first few.
The backbone is frozen (no gradients) and stays in eval mode, BatchNorm statistics included,
even if something calls `.train()` on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cmg.checkpoint import load_state_dict_strict
from cmg.errors import fail

FORMATS = ("cmg", "csi", "torchvision")
CSI_EXTRA_HEADS = ("simclr_layer.", "shift_cls_layer.", "joint_distribution_layer.")


class CsiBlock(nn.Module):
    """CSI's BasicBlock, with its parameter names (conv1, bn1, conv2, bn2, shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class CsiResNet18Features(nn.Module):
    """CSI's CIFAR ResNet-18 up to its penultimate 512-d features (normalisation included)."""

    out_dim = 512

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            setattr(self, f"layer{i}", nn.Sequential(CsiBlock(cin, cout, stride),
                                                     CsiBlock(cout, cout, 1)))
            cin = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1((x - 0.5) / 0.5)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, out.shape[-1]).flatten(1)


class TorchvisionResNet18Features(nn.Module):
    """torchvision's ResNet-18 without `fc`, with ImageNet normalisation in front."""

    out_dim = 512

    def __init__(self):
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(weights=None)
        self.net.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class LinearHead(nn.Module):
    """A single linear layer (the backbone's own class head); `out` is what stage 2 trains."""

    def __init__(self, in_dim: int, outputs: int):
        super().__init__()
        self.out = nn.Linear(in_dim, outputs)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(f)


class FrozenExtractor(nn.Module):
    """Wraps a feature extractor: no gradients, always in eval mode (BatchNorm stats fixed)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.out_dim = net.out_dim

    def train(self, mode: bool = True) -> "FrozenExtractor":
        super().train(False)  # whoever asks for training mode, the backbone stays in eval
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BackboneClassifier(nn.Module):
    """The interface of `cmg.models.Classifier` (features, head with K + 1 outputs)."""

    def __init__(self, features: nn.Module, head: nn.Module, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.features = FrozenExtractor(features)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        fail(f"backbone {path} does not exist; fix --backbone")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        fail(f"backbone {path} cannot be read as a state dict "
             f"({str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__})")
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"backbone {path} is not a state dict of tensors; save it with "
             "torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(path: str | os.PathLike, fmt: str, num_classes: int, family: str = "cifar",
                  head_width: int = 512, device: str | torch.device = "cpu",
                  trained_for: tuple | None = None) -> nn.Module:
    """A frozen external backbone with a head of K + 1 outputs, ready for stage 2.
    `trained_for` (setting, partition, DataConfig): what a `cmg` checkpoint must have been
    trained on."""
    path = Path(path)
    if fmt not in FORMATS:
        fail(f"unknown --backbone-format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "cmg":
        from cmg.stage1 import load_stage1_model

        model = load_stage1_model(path, "classifier", device=device, trained_for=trained_for)
        if model.num_classes != num_classes:
            fail(f"backbone {path} has {model.num_classes} classes, the setting {num_classes}")
        return BackboneClassifier(model.features, model.head, num_classes).to(device).eval()
    if family != "cifar":
        fail(f"--backbone-format {fmt} is a CIFAR (3x32x32) model; use a CIFAR setting")
    state = _load_state(path)
    if fmt == "csi":
        state = {k: v for k, v in state.items() if not k.startswith(CSI_EXTRA_HEADS)}
        head_state = {k.removeprefix("linear."): state.pop(k) for k in list(state)
                      if k.startswith("linear.")}
        features: nn.Module = CsiResNet18Features()
        load_state_dict_strict(features, state, path, f"{fmt} backbone",
                               "check --backbone-format")
        classes = head_state["weight"].shape[0] if "weight" in head_state else None
        if classes != num_classes or set(head_state) != {"weight", "bias"}:
            fail(f"backbone {path}: its linear head has {classes} classes, the setting "
                 f"{num_classes}; CSI+CMG needs the labelled CIFAR-10 model (different_dataset)")
        head = LinearHead(features.out_dim, num_classes + 1)
        with torch.no_grad():  # CSI's K class rows, and a zero row for the OOD class
            head.out.weight.zero_()
            head.out.bias.zero_()
            head.out.weight[:num_classes] = head_state["weight"]
            head.out.bias[:num_classes] = head_state["bias"]
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        features = TorchvisionResNet18Features()
        load_state_dict_strict(features.net, state, path, f"{fmt} backbone",
                               "check --backbone-format")
        from cmg.models.classifier import Head

        head = Head(features.out_dim, head_width, num_classes + 1)
    return BackboneClassifier(features, head, num_classes).to(device).eval()


@dataclass(frozen=True)
class BackboneSpec:
    """`--backbone PATH --backbone-format FMT`, with the file's hash (part of a sweep's stage-1
    artifact key, so another file never reuses a CVAE trained beside a different backbone).
    A `{partition}` in PATH names one file per partition; the hash then covers them all."""

    path: str
    fmt: str
    sha256: str

    @classmethod
    def from_args(cls, path: str | os.PathLike, fmt: str,
                  partitions: tuple[int, ...] = (1,)) -> "BackboneSpec":
        """`partitions`: those the run or sweep uses (their files must all exist). A `cmg`
        backbone for several partitions must name one file per partition."""
        if fmt not in FORMATS:
            fail(f"unknown --backbone-format {fmt!r}; choose one of {', '.join(FORMATS)}")
        path = str(Path(path).expanduser().resolve())
        if fmt == "cmg" and len(partitions) > 1 and "{partition}" not in path:
            fail(f"a cmg backbone is trained for one partition: put {{partition}} in --backbone "
                 f"(e.g. {Path(path).with_suffix('')}_p{{partition}}.pt), one file per partition")
        files = {p: Path(path.replace("{partition}", str(p))) for p in partitions}
        for file in files.values():
            if not file.is_file():
                fail(f"backbone {file} does not exist; fix --backbone")
        digests = [file_sha256(file) for file in files.values()]
        sha = digests[0] if "{partition}" not in path else hashlib.sha256(
            "".join(digests).encode()).hexdigest()
        return cls(path, fmt, sha)

    def file(self, partition: int) -> str:
        """The backbone file of `partition`."""
        return self.path.replace("{partition}", str(partition))

    def identity(self) -> dict[str, str]:
        return {"format": self.fmt, "sha256": self.sha256}

    def load(self, num_classes: int, family: str, head_width: int = 512,
             device: str | torch.device = "cpu", path: str | os.PathLike | None = None,
             trained_for: tuple | None = None) -> nn.Module:
        """The backbone (from `path` if given: e.g. its copy in a sweep's artifact store; else
        the file of trained_for's partition). `trained_for` (setting, partition, DataConfig)."""
        partition = trained_for[1] if trained_for is not None else 1
        return load_backbone(path or self.file(partition), self.fmt, num_classes, family,
                             head_width, device, trained_for)
