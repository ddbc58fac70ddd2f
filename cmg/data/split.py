"""One partition of a setting as tensors: train / validation / test, IND and OOD.

Validation is a fixed, seeded share (10%) of every class of the train split, drawn per class and
independently of the partition. Validation IND = those images of the IND classes; validation OOD
= those of the OOD classes (train split, never the test split), so model and hyperparameter
selection never touches the test set. In Setting 2 (OOD = other data sets, which have no train
split here) validation OOD is a fixed, seeded 20% of each OOD set and the test uses the other
80%. With `DataConfig.val_ood="rotated"` (Setting 1) validation OOD is instead the validation IND
images, each rotated by 90, 180 or 270 degrees: selection blind to the unseen classes. Images
stay uint8 (N, C, H, W); `batches` slices them on the training device and
`to_float` maps to [0, 1] (the reference's ToTensor, no normalisation).

    split = make_split("same_dataset_mnist", 1, DataConfig()).to("cuda")
    for idx in batches(len(split.train_x), 128, generator):
        x = to_float(split.train_x[idx])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch

from cmg.config import DataConfig
from cmg.errors import fail
from cmg.data.ood import load_ood_sets
from cmg.data.settings import Setting, get_setting
from cmg.data.sources import resolve_data_root

OOD_VAL_FRACTION = 0.2  # Setting 2: share of each OOD set used for validation (the rest: test)


@dataclass(frozen=True)
class Split:
    """Tensors of one (setting, partition). Labels of IND parts are relabelled 0..K-1."""

    setting: str
    partition: int
    family: str
    ind_classes: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_ind_x: torch.Tensor
    val_ind_y: torch.Tensor
    val_ood_x: torch.Tensor
    test_ind_x: torch.Tensor
    test_ind_y: torch.Tensor
    test_ood_x: torch.Tensor
    # Setting 2: the OOD parts are several data sets, concatenated in this order:
    # (name, images in val_ood_x, images in test_ood_x). Empty: one OOD set, the held-out classes.
    ood_sets: tuple[tuple[str, int, int], ...] = ()
    skipped_ood_sets: tuple[str, ...] = ()  # requested with `all` but not under the data root
    data: DataConfig = DataConfig()  # the data config it was made with

    @property
    def num_classes(self) -> int:
        return len(self.ind_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "Split":
        moved = {f.name: getattr(self, f.name).to(device)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def ood_slices(self, part: str) -> dict[str, slice]:
        """Where each OOD set lies in `{part}_ood_x` ("ood" = all of it in Setting 1)."""
        if not self.ood_sets:
            return {"ood": slice(0, len(getattr(self, f"{part}_ood_x")))}
        out, start = {}, 0
        for name, n_val, n_test in self.ood_sets:
            n = n_val if part == "val" else n_test
            out[name] = slice(start, start + n)
            start += n
        return out

    def eval_sets(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(IND images, IND labels, OOD images) of 'val' or 'test'."""
        return (getattr(self, f"{part}_ind_x"), getattr(self, f"{part}_ind_y"),
                getattr(self, f"{part}_ood_x"))


def _seeded(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + sum(v * 7919 ** i for i, v in enumerate(salt)))
    return g


def _split_train(labels: torch.Tensor, classes, cfg: DataConfig) -> tuple[dict, dict]:
    """Per class: (train indices, val indices), each class permuted with its own seeded generator."""
    train, val = {}, {}
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=_seeded(cfg.split_seed, c))]
        n_val = max(1, round(cfg.val_fraction * len(idx)))
        val[c], train[c] = idx[:n_val], idx[n_val:]
    return train, val


def _limit(idx: torch.Tensor, limit: int | None, seed: int, *salt: int) -> torch.Tensor:
    if limit is None or len(idx) <= limit:
        return idx
    return idx[torch.randperm(len(idx), generator=_seeded(seed, *salt))[:limit]]


def name_salt(name: str) -> int:
    """A stable 32-bit number of an OOD set's name: its split never depends on which other sets
    are present or in what order."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _split_ood_sets(sets: dict[str, torch.Tensor], cfg: DataConfig):
    """Setting 2: a fixed, seeded OOD_VAL_FRACTION of every OOD set for validation, the rest for
    the test (each part capped at eval_limit), seeded by the set's name."""
    val, test, layout = [], [], []
    for name, images in sets.items():
        salt = name_salt(name)
        order = torch.randperm(len(images), generator=_seeded(cfg.split_seed, 100, salt))
        n_val = max(1, round(OOD_VAL_FRACTION * len(images)))
        v = _limit(order[:n_val], cfg.eval_limit, cfg.split_seed, 200, salt)
        t = _limit(order[n_val:], cfg.eval_limit, cfg.split_seed, 300, salt)
        val.append(images[v])
        test.append(images[t])
        layout.append((name, len(v), len(t)))
    return torch.cat(val), torch.cat(test), tuple(layout)


def rotated(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Each (C, H, W) image turned by 90, 180 or 270 degrees (seeded, a third each): a proxy OOD
    made of IND images only, so that selection never sees an unseen class (`val_ood=rotated`)."""
    turns = torch.randint(1, 4, (len(images),), generator=_seeded(seed, 5))
    out = images.clone()
    for k in (1, 2, 3):
        out[turns == k] = torch.rot90(images[turns == k], k, dims=(-2, -1))
    return out


def make_split(setting: str | Setting, partition: int, cfg: DataConfig = DataConfig(),
               data_root: str | Path | None = None, download: bool = False,
               ood_datasets: str | None = "all") -> Split:
    """Build the tensors of one partition (CPU); raises UsageError for missing data or partition.
    `ood_datasets` (Setting 2 only): `all` or a comma-separated list of OOD_LOADERS' names, or
    None for no OOD images (stage-1 training needs none)."""
    s = get_setting(setting) if isinstance(setting, str) else setting
    if s.ood_from_datasets and cfg.val_ood != "unseen":
        fail(f"data.val_ood={cfg.val_ood} is for settings whose OOD are held-out classes; "
             f"{s.name} validates on its OOD data sets (its report holds each set out in turn)")
    ind, ood = s.ind_classes(partition), s.ood_classes(partition)
    root = resolve_data_root(data_root)
    train_x, train_y, test_x, test_y = s.source(root, download)
    train_idx, val_idx = _split_train(train_y, range(s.num_source_classes), cfg)

    per_class = None if cfg.train_limit is None else max(1, cfg.train_limit // len(ind))
    train_sel = torch.cat([train_idx[c][:per_class] for c in ind])
    val_ind = _limit(torch.cat([val_idx[c] for c in ind]), cfg.eval_limit, cfg.split_seed, 1)
    test_ind = _limit(torch.nonzero(torch.isin(test_y, torch.tensor(ind))).flatten(),
                      cfg.eval_limit, cfg.split_seed, 3)

    relabel = torch.full((s.num_source_classes,), -1, dtype=torch.long)
    relabel[list(ind)] = torch.arange(len(ind))
    extra = {}
    if s.ood_from_datasets and ood_datasets is None:
        val_ood_x = test_ood_x = train_x[:0]
    elif s.ood_from_datasets:
        sets, skipped = load_ood_sets(ood_datasets, root, download)
        val_ood_x, test_ood_x, layout = _split_ood_sets(sets, cfg)
        extra = {"ood_sets": layout, "skipped_ood_sets": tuple(skipped)}
    else:  # Setting 1: the held-out classes of the same data set
        test_ood = _limit(torch.nonzero(torch.isin(test_y, torch.tensor(ood))).flatten(),
                          cfg.eval_limit, cfg.split_seed, 4)
        test_ood_x = test_x[test_ood]
        if cfg.val_ood == "rotated":  # blind: no image of an unseen class before the test
            val_ood_x = rotated(train_x[val_ind], cfg.split_seed)
        else:
            val_ood = _limit(torch.cat([val_idx[c] for c in ood]), cfg.eval_limit,
                             cfg.split_seed, 2)
            val_ood_x = train_x[val_ood]
    return Split(
        setting=s.name, partition=partition, family=s.family, ind_classes=tuple(ind),
        train_x=train_x[train_sel], train_y=relabel[train_y[train_sel]],
        val_ind_x=train_x[val_ind], val_ind_y=relabel[train_y[val_ind]],
        val_ood_x=val_ood_x,
        test_ind_x=test_x[test_ind], test_ind_y=relabel[test_y[test_ind]],
        test_ood_x=test_ood_x, data=cfg, **extra,
    )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (channels-last kept if the input has it)."""
    return x.float().div_(255.0)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu", drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors over range(n): shuffled when a generator is given, else in order."""
    order = (torch.randperm(n, generator=generator) if generator is not None
             else torch.arange(n)).to(device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                     pad: int = 4) -> torch.Tensor:
    """RandomCrop(H, padding=pad) + RandomHorizontalFlip as one batched tensor op on x's device."""
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (n, h)
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n, device=dev)[:, None, None, None],
                 torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out
