"""Settings (which data, which model family) and the five class partitions, with a registry.

A setting names a source of labelled images and the partitions that split its classes into
in-distribution (IND) and out-of-distribution (OOD). The built-in ones are the reference's
Setting 1; add your own with `register_setting`::

    from cmg.data import Setting, register_setting, SAME_DATASET_PARTITIONS

    def load_fashion(root, download):           # -> (train_x, train_y, test_x, test_y)
        ...                                     # uint8 N x C x H x W tensors, int64 labels

    register_setting(Setting("same_dataset_fashion", family="mnist", source=load_fashion,
                             partitions=SAME_DATASET_PARTITIONS))

A setting registered in a module (say `mysets.py`) reaches every command line, and every trial
process of a sweep, with `--setting mysets:same_dataset_fashion` (or `--setting-module mysets
--setting same_dataset_fashion`): the module is imported before the setting is looked up, so it
must be importable on every node (the working directory or $PYTHONPATH).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from cmg.config import DEFAULT_SIGMA
from cmg.errors import fail

# IND class ids per partition (the reference's table); the other classes are OOD. IND classes are
# relabelled 0..K-1 in the order listed.
SAME_DATASET_PARTITIONS: dict[int, tuple[int, ...]] = {
    1: (0, 1, 2, 3, 4, 5),
    2: (1, 2, 3, 4, 5, 6),
    3: (2, 3, 4, 5, 6, 7),
    4: (3, 4, 5, 6, 7, 8),
    5: (4, 5, 6, 7, 8, 9),
}
# Setting 2: all ten classes are IND in its single partition; OOD comes from other data sets.
ALL_CLASSES_PARTITION: dict[int, tuple[int, ...]] = {1: tuple(range(10))}

RawData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Source = Callable[[Path, bool], RawData]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# The input images of each model family: uint8 channels x height x width.
IMAGE_SHAPE = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}


@dataclass(frozen=True)
class Setting:
    """A data setting. `source(root, download)` returns uint8 NCHW images and int64 labels for the
    train and test splits; `family` picks the models ("mnist": 1x28x28, "cifar": 3x32x32)."""

    name: str
    family: str
    source: Source
    partitions: dict[int, tuple[int, ...]]
    num_source_classes: int = 10
    # True: the OOD images come from other data sets (cmg.data.ood), not from held-out classes
    ood_from_datasets: bool = False
    class_names: tuple[str, ...] = ()  # names of the source classes by id (default: the ids)

    def class_name(self, class_id: int) -> str:
        return self.class_names[class_id] if self.class_names else str(class_id)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return IMAGE_SHAPE[self.family]

    def ind_classes(self, partition: int) -> tuple[int, ...]:
        if partition not in self.partitions:
            fail(f"partition {partition} does not exist for {self.name}; "
                 f"choose one of {', '.join(map(str, self.partitions))}")
        return self.partitions[partition]

    def ood_classes(self, partition: int) -> tuple[int, ...]:
        ind = set(self.ind_classes(partition))
        return tuple(c for c in range(self.num_source_classes) if c not in ind)


_REGISTRY: dict[str, Setting] = {}


def register_setting(setting: Setting) -> Setting:
    """Add (or replace) a setting under its name; returns it."""
    if setting.family not in DEFAULT_SIGMA:
        raise ValueError(f"family must be one of {sorted(DEFAULT_SIGMA)}, not {setting.family!r}")
    _REGISTRY[setting.name] = setting
    return setting


def get_setting(name: str) -> Setting:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        fail(f"unknown setting '{name}'; choose one of {known}")
    return _REGISTRY[name]


def setting_modules(spec: str, modules: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules to import before looking up `spec`: `modules`, and MODULE of "MODULE:NAME"."""
    module, sep, _ = spec.rpartition(":")
    return tuple(dict.fromkeys([*modules, *([module] if sep else [])]))


def import_setting_modules(modules: Iterable[str]) -> None:
    """Import the modules that register a user's own settings (in the driver and every trial)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            fail(f"cannot import setting module '{module}' ({err}); put it in the working "
                 "directory or on $PYTHONPATH, or fix --setting MODULE:NAME / --setting-module")


def load_setting(spec: str, modules: Iterable[str] = ()) -> Setting:
    """A setting by name ("same_dataset_mnist") or by "MODULE:NAME", after importing `modules`."""
    module, sep, name = spec.rpartition(":")
    import_setting_modules(setting_modules(spec, modules))
    if sep and name not in _REGISTRY:
        fail(f"module '{module}' registers no setting '{name}'; registered settings: "
             f"{', '.join(sorted(_REGISTRY))}")
    return get_setting(name)


def setting_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_partition(value: str | int) -> int:
    """Accept 3, "3" or the reference's "partition3"."""
    text = str(value).strip().lower().removeprefix("partition")
    if not text.isdigit():
        fail(f"partition '{value}' is not a number; use 1..5 or partition1..partition5")
    return int(text)
