"""OOD test sets of Setting 2 (`different_dataset`): IND is all of CIFAR-10, OOD is another data set.

The reference's names, and where each set is read from under the data root:

    SVHN          torchvision's SVHN test split     (SVHN/test_32x32.mat; --download fetches it)
    CIFAR100      torchvision's CIFAR-100 test split (cifar-100-python/test; --download)
    LSUN          LSUN_resize/       folders of 32x32 PNG or JPEG images prepared by the CSI
    tinyImageNet  Imagenet_resize/   project: flat, or one sub-folder per class (any depth)
    LSUN-FIX      LSUN_fix/
    ImageNet-FIX  Imagenet_fix/

Every loader returns uint8 (N, 3, 32, 32) images. A set that is not there raises `MissingOODSet`
(a UsageError), so `--ood-dataset all` can skip it by name; an image that is not 32x32 or an empty
folder is a one-line error naming the file or folder.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmg.data.sources import fetch_or_fail, read_cifar_batches
from cmg.errors import UsageError, fail

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SETS = {"LSUN": "LSUN_resize", "tinyImageNet": "Imagenet_resize",
               "LSUN-FIX": "LSUN_fix", "ImageNet-FIX": "Imagenet_fix"}


class MissingOODSet(UsageError):
    """The OOD set is not under the data root (and was not downloaded)."""


def _require(path: Path, dataset: str, root: Path, download: bool) -> None:
    """Download the torchvision set `dataset` if asked and missing; else it must exist."""
    if not path.is_file() and download:
        import torchvision

        if dataset == "SVHN":
            fetch_or_fail(dataset, root, lambda: torchvision.datasets.SVHN(
                str(root / "SVHN"), split="test", download=True))
        else:
            fetch_or_fail(dataset, root, lambda: torchvision.datasets.CIFAR100(
                str(root), train=False, download=True))
    if not path.is_file():
        raise MissingOODSet(f"{dataset} not found at {path}; pass --download")


def load_svhn(root: Path, download: bool = False) -> torch.Tensor:
    path = root / "SVHN" / "test_32x32.mat"
    _require(path, "SVHN", root, download)
    from scipy.io import loadmat

    images = loadmat(str(path))["X"]  # (32, 32, 3, N)
    return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (3, 2, 0, 1))))


def load_cifar100(root: Path, download: bool = False) -> torch.Tensor:
    path = root / "cifar-100-python" / "test"
    _require(path, "CIFAR100", root, download)
    return read_cifar_batches([path])[0]


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG file under `folder` (any depth), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Path) -> torch.Tensor:
    """Every PNG/JPEG under `folder` (flat or in sub-folders), sorted by path, as 32x32 RGB."""
    from PIL import Image

    if not folder.is_dir():
        raise MissingOODSet(f"{folder.name} not found in {folder.parent}; put the CSI project's "
                            f"{folder.name} folder of 32x32 images there")
    files = image_files(folder)
    if not files:
        fail(f"no PNG or JPEG images in {folder}; fill it or remove the folder")
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            if image.size != (32, 32):
                fail(f"{path} is {image.size[0]}x{image.size[1]}, not 32x32; resize the set to "
                     "32x32 (the reference's sets are 32x32 already)")
            images[i] = np.asarray(image.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _folder_loader(name: str) -> Callable[[Path, bool], torch.Tensor]:
    return lambda root, download=False: load_image_folder(root / FOLDER_SETS[name])


OOD_LOADERS: dict[str, Callable[[Path, bool], torch.Tensor]] = {
    "SVHN": load_svhn,
    "LSUN": _folder_loader("LSUN"),
    "tinyImageNet": _folder_loader("tinyImageNet"),
    "LSUN-FIX": _folder_loader("LSUN-FIX"),
    "ImageNet-FIX": _folder_loader("ImageNet-FIX"),
    "CIFAR100": load_cifar100,
}


@functools.lru_cache(maxsize=8)
def load_ood_set(name: str, root: Path, download: bool = False) -> torch.Tensor:
    return OOD_LOADERS[name](root, download)


def parse_ood_datasets(text: str) -> tuple[tuple[str, ...], bool]:
    """`all` or a comma-separated list of the reference's names -> (names, skip missing?)."""
    if text.strip().lower() == "all":
        return tuple(OOD_LOADERS), True
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    by_lower = {n.lower(): n for n in OOD_LOADERS}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        fail(f"unknown OOD data set {', '.join(unknown) or repr(text)}; choose from "
             f"{', '.join(OOD_LOADERS)} or all")
    return tuple(by_lower[n.lower()] for n in names), False


def load_ood_sets(text: str, root: Path, download: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                          list[str]]:
    """The requested sets that exist ({name: images}) and the names skipped as missing. With
    explicit names a missing set is an error; with `all`, at least one set must be present."""
    names, skip_missing = parse_ood_datasets(text)
    found, missing = {}, []
    for name in names:
        try:
            found[name] = load_ood_set(name, root, download)
        except MissingOODSet:
            if not skip_missing:
                raise
            missing.append(name)
    if not found:
        fail(f"none of the OOD sets ({', '.join(names)}) is under {root}; pass --download for "
             "SVHN and CIFAR100, or add the CSI folders (LSUN_resize, Imagenet_resize, ...)")
    return found, missing
