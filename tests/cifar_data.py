"""The tests' CIFAR data root: the package's synthetic one (cmg.data.synthetic) with foolbox's 20
real CIFAR-10 and 20 real CIFAR-100 test images as its test images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from cmg.data.synthetic import write_cifar_data_root


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


def build_cifar_data_root(root: Path) -> Path:
    return write_cifar_data_root(root, real_images("cifar10"), real_images("cifar100"))
