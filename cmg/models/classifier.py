"""The IND classifiers: a feature extractor followed by an MLP head.

The head has K + 1 outputs: the K IND classes and, at index K, the "OOD" slot that CMG-softmax
trains in stage 2 (the reference kept 11 outputs for 6 classes; see docs/design.md). Baselines
and energies only ever use the K IND logits (`ind_logits`), in training and at test time
(the reference's defect 2 mixed the two).

    model = build_classifier("mnist", num_classes=6)
    logits = model(torch.rand(8, 1, 28, 28))            # (8, 7)
"""

from __future__ import annotations

import torch
from torch import nn

from cmg.config import ClassifierConfig


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.2)]


class MnistConvNet(nn.Module):
    """The reference's 9-layer MNIST CNN: 28 -> 14 -> 7 -> 4, flattened to 128*4*4 = 2048.

    Dropout2d(0.2) sits before layers 4 and 7; before layer 1 only with `input_dropout=True`
    (the reference's defect 5: on a 1-channel input it blanks whole images)."""

    out_dim = 128 * 4 * 4

    def __init__(self, input_dropout: bool = False):
        super().__init__()
        channels = [(1, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128),
                    (128, 128), (128, 128), (128, 128)]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(channels, start=1):
            if i in (4, 7) or (i == 1 and input_dropout):
                layers.append(nn.Dropout2d(0.2))
            layers += conv_bn(cin, cout, stride=2 if i % 3 == 0 else 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # flatten (not view): works on channels-last input


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, [2, 2, 2, 2] blocks, global average pool."""

    out_dim = 512

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class Head(nn.Module):
    """MLP head: features -> width -> outputs. Stage 2 fine-tunes this (or only `out`)."""

    def __init__(self, in_dim: int, width: int, outputs: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, width)
        self.out = nn.Linear(width, outputs)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(f)))


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int, head_width: int):
        super().__init__()
        self.num_classes = num_classes
        self.features = features
        self.head = Head(features.out_dim, head_width, num_classes + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def ind_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The K IND logits of a (N, K + 1) output."""
    return logits[:, :num_classes]


def build_classifier(family: str, num_classes: int,
                     cfg: ClassifierConfig = ClassifierConfig()) -> Classifier:
    if family == "mnist":
        features: nn.Module = MnistConvNet(cfg.input_dropout)
    elif family == "cifar":
        features = CifarResNet18()
    else:
        raise ValueError(f"unknown model family {family!r}")
    return Classifier(features, num_classes, cfg.head_width)
