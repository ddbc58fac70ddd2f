"""`synthetic_cifar10`: learnable 3x32x32 images made on the fly, to exercise the CIFAR models
anywhere (tests, GPU checks) without downloading CIFAR-10. Each class is a bright band at its own
rows in its own colour channel, on noise: easy to classify, so a short run must beat chance."""

from __future__ import annotations

from pathlib import Path

import torch

from cmg.data.settings import RawData


def synthetic_images(n: int, seed: int, channels: int = 3, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = torch.rand(n, channels, size, size, generator=g) * 60
    for c in range(10):
        start = 3 * c % (size - 8)
        x[labels == c, c % channels, start:start + 8, :] += 150
    return x.clamp(0, 255).to(torch.uint8), labels


def load_synthetic_cifar10(root: Path, download: bool = False, n_train: int = 600,
                           n_test: int = 200) -> RawData:
    train_x, train_y = synthetic_images(n_train, seed=1)
    test_x, test_y = synthetic_images(n_test, seed=2)
    return train_x, train_y, test_x, test_y
