"""A data root for the CIFAR settings without CIFAR-10 on disk: foolbox's 20 real CIFAR-10 and
20 real CIFAR-100 test images, synthetic 3x32x32 images for volume, and OOD folders of generated
PNG/JPEG images in both layouts (flat, and one sub-folder per class)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from cmg.data.synthetic import synthetic_images


def real_images(prefix: str) -> tuple[np.ndarray, list[int]]:
    """foolbox's 20 real test images of CIFAR-10 or CIFAR-100 (NCHW uint8), labels from names."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        import pytest

        pytest.fail("the CIFAR tests need foolbox's 20 real CIFAR images: "
                    "pip install -e '.[dev]' (or pip install foolbox==3.3.4)", pytrace=False)
    foolbox = Path(spec.origin).parent / "data"
    files = sorted(foolbox.glob(f"{prefix}_*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return images.transpose(0, 3, 1, 2), [int(f.stem.rsplit("_", 1)[1]) for f in files]


def write_batch(path: Path, images: np.ndarray, labels, key: str = "labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # the layout of torchvision's python batches
        pickle.dump({"data": images.reshape(len(images), -1), key: list(labels)}, f)


def noise_png(path: Path, seed: int, size: int = 32, fmt: str = "PNG") -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def build_cifar_data_root(root: Path, real: bool = True) -> Path:
    """`real=False`: synthetic images only (where foolbox is not installed, e.g. a GPU machine)."""
    train_x, train_y = synthetic_images(600, seed=1)
    for i in range(5):
        part = slice(120 * i, 120 * (i + 1))
        write_batch(root / "cifar-10-batches-py" / f"data_batch_{i + 1}",
                    train_x[part].numpy(), train_y[part].tolist())
    def twenty(prefix: str, seed: int) -> tuple[np.ndarray, list[int]]:
        if real:
            return real_images(prefix)
        x, y = synthetic_images(20, seed=seed)
        return x.numpy(), y.tolist()

    real10, labels10 = twenty("cifar10", seed=3)
    synth_x, synth_y = synthetic_images(100, seed=2)
    write_batch(root / "cifar-10-batches-py" / "test_batch",
                np.concatenate([real10, synth_x.numpy()]), labels10 + synth_y.tolist())
    real100, labels100 = twenty("cifar100", seed=4)
    write_batch(root / "cifar-100-python" / "test", real100, labels100, key="fine_labels")
    for i in range(25):  # LSUN: a flat folder of PNGs
        noise_png(root / "LSUN_resize" / f"{i:04d}.png", seed=i)
    for i in range(25):  # tinyImageNet: class sub-folders, PNG and JPEG
        fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        noise_png(root / "Imagenet_resize" / f"class_{i % 3}" / f"{i:04d}.{suffix}", 100 + i,
                  fmt=fmt)
    return root
