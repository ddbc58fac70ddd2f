"""`synthetic_cifar10`: learnable 3x32x32 images made on the fly, to exercise the CIFAR models
anywhere (tests, GPU checks) without downloading CIFAR-10. Each class is a bright band at its own
rows in its own colour channel, on noise: easy to classify, so a short run must beat chance.

`write_cifar_data_root(root)` writes such images in the files the CIFAR settings read (Setting 2
included: CIFAR-10 and CIFAR-100 batches, and OOD image folders), so that `different_dataset`
runs without any download:

    root = write_cifar_data_root(Path("data/fake"))
    # python -m cmg.run --setting different_dataset --data-root data/fake --budget smoke
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def write_batch(path: Path, images: np.ndarray, labels, key: str = "labels") -> None:
    """Images (NCHW uint8) and labels in the layout of torchvision's CIFAR python batches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1), key: list(labels)}, f)


def noise_png(path: Path, seed: int, size: int = 32, fmt: str = "PNG") -> np.ndarray:
    """A seeded size x size RGB noise image saved at `path` (PNG or JPEG); returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def write_cifar_data_root(root: Path, cifar10_test=None, cifar100_test=None) -> Path:
    """A small data root for the CIFAR settings: 600 synthetic CIFAR-10 training images (5
    batches), a test batch of 20 images plus 100 synthetic ones, a CIFAR-100 test batch of 20,
    LSUN as a flat folder of 25 PNGs and tinyImageNet as 25 PNG/JPEG images in class
    sub-folders. `cifar10_test`, `cifar100_test`: (NCHW uint8 images, labels) to use as those 20
    test images (e.g. real ones); synthetic ones by default."""
    train_x, train_y = synthetic_images(600, seed=1)
    for i in range(5):
        part = slice(120 * i, 120 * (i + 1))
        write_batch(root / "cifar-10-batches-py" / f"data_batch_{i + 1}",
                    train_x[part].numpy(), train_y[part].tolist())

    def twenty(given, seed: int) -> tuple[np.ndarray, list[int]]:
        if given is not None:
            return np.asarray(given[0]), list(given[1])
        x, y = synthetic_images(20, seed=seed)
        return x.numpy(), y.tolist()

    test10, labels10 = twenty(cifar10_test, seed=3)
    synth_x, synth_y = synthetic_images(100, seed=2)
    write_batch(root / "cifar-10-batches-py" / "test_batch",
                np.concatenate([test10, synth_x.numpy()]), labels10 + synth_y.tolist())
    test100, labels100 = twenty(cifar100_test, seed=4)
    write_batch(root / "cifar-100-python" / "test", test100, labels100, key="fine_labels")
    for i in range(25):  # LSUN: a flat folder of PNGs
        noise_png(root / "LSUN_resize" / f"{i:04d}.png", seed=i)
    for i in range(25):  # tinyImageNet: class sub-folders, PNG and JPEG
        fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        noise_png(root / "Imagenet_resize" / f"class_{i % 3}" / f"{i:04d}.{suffix}", 100 + i,
                  fmt=fmt)
    return root
