"""`python -m cmg.score`: score new images with an exported CMG detector, one CSV row per image.

    python -m cmg.score detector/partition-1 my_images/ --out scores.csv
    python -m cmg.score detector/partition-1 digits.npy --out scores.csv --device cuda
    python -m cmg.score detector/partition-1 FashionMNIST --data-root datasets --limit 100

INPUT is a folder of PNG/JPEG images (any depth, sorted by path), an .npy file of uint8 images
(N, C, H, W) or (N, H, W), or the name of a torchvision data set (its test split, read from
--data-root; nothing is downloaded). Columns: input (path relative to the folder, or index),
pred_class and pred_name (the most likely IND class), cmg (higher = more OOD), is_ood (cmg above
the detector's threshold: 95% IND true-positive rate on validation), then each baseline score
of the stage-1 classifier. Bad input (wrong size or channels, empty folder, a detector of another
version) is one error line and exit code 2, and no CSV is written.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cmg.cli import add_data_root_arg, add_device_arg, resolve_device
from cmg.data import resolve_data_root
from cmg.data.ood import image_files
from cmg.detector import Detector
from cmg.errors import (OneLineParser, add_quiet_arg, atomic_write, command_parser,
                        exit_on_usage_error, fail)


def build_parser() -> OneLineParser:
    p = command_parser("python -m cmg.score", __doc__)
    p.add_argument("detector", help="a detector folder (python -m tune.export ... DIR/partition-N)")
    p.add_argument("input", help="image folder, .npy file of uint8 images, or a torchvision "
                                 "data set name (with --data-root)")
    p.add_argument("--out", default="scores.csv", help="CSV file to write")
    add_data_root_arg(p)
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    add_quiet_arg(p)
    return p


def _pixels(image, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A PIL image as a (C, H, W) uint8 array of the detector's shape, else a one-line error."""
    if image.mode in ("1", "P"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    channels, (width, height) = len(image.getbands()), image.size
    if channels != shape[0]:
        fail(f"{name} has {channels} channel(s) ({image.mode}), the detector needs {shape[0]} "
             f"({'grayscale L' if shape[0] == 1 else 'RGB'}); convert the images")
    if (height, width) != tuple(shape[1:]):
        fail(f"{name} is {width}x{height}, the detector needs {shape[2]}x{shape[1]}; "
             "resize the images")
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _folder(folder: Path, shape, limit: int | None) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    files = image_files(folder)[:limit]
    if not files:
        fail(f"no PNG or JPEG images in {folder} (searched at any depth); fix INPUT")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(_pixels(image, shape, str(path)))
    return np.stack(images), [str(p.relative_to(folder)) for p in files]


def _npy(path: Path, limit: int | None) -> tuple[np.ndarray, list[int]]:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        fail(f"{path} is not a readable .npy array ({err}); save it with numpy.save")
    images = images[:limit]
    return images, list(range(len(images)))


def _torchvision(name: str, data_root: str | None, shape,
                 limit: int | None) -> tuple[np.ndarray, list[int]]:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(cls):
        fail(f"INPUT {name} is not a folder, an .npy file or a torchvision data set name "
             "(e.g. MNIST, FashionMNIST, CIFAR10, SVHN)")
    params = inspect.signature(cls).parameters
    test = {"train": False} if "train" in params else {"split": "test"} if "split" in params else {}
    root = resolve_data_root(data_root)
    try:
        dataset = cls(str(root), download=False, **test)
    except (RuntimeError, OSError) as err:
        fail(f"{name} not found under {root} ({str(err).splitlines()[0][:100]}); point "
             "--data-root at it (nothing is downloaded here)")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return (np.stack([_pixels(dataset[i][0], shape, f"{name}[{i}]") for i in range(count)]),
            list(range(count)))


def read_input(text: str, shape: tuple[int, ...], data_root: str | None = None,
               limit: int | None = None) -> tuple[np.ndarray, list]:
    """(uint8 images, their names: relative paths or indices) of INPUT."""
    path = Path(text)
    if path.is_dir():
        return _folder(path, shape, limit)
    if path.suffix == ".npy":
        if not path.is_file():
            fail(f"{path} does not exist; fix INPUT")
        return _npy(path, limit)
    if path.exists():
        fail(f"{path} is neither a folder of images nor an .npy file; fix INPUT")
    return _torchvision(text, data_root, shape, limit)


def score_input(detector: Detector, text: str, data_root: str | None = None,
                limit: int | None = None, batch_size: int = 512) -> pd.DataFrame:
    images, names = read_input(text, tuple(detector.meta["input"]["shape"]), data_root, limit)
    table = detector.score(images, batch_size)
    table.insert(0, "input", names)
    return table


@exit_on_usage_error
def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        fail("--limit and --batch-size must be at least 1")
    detector = Detector.load(args.detector, resolve_device(args.device))
    table = score_input(detector, args.input, args.data_root, args.limit, args.batch_size)
    with atomic_write(args.out, "w") as handle:
        table.to_csv(handle, index=False)
    if not args.quiet:
        print(table.head(20).to_string(index=False, float_format="%.5g"))
    print(f"{len(table)} images, {int(table['is_ood'].sum())} flagged OOD (cmg > "
          f"{detector.meta['threshold']:.4f}); wrote {args.out}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
