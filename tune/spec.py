"""What a sweep is, as one typed object: `tune.sweep` builds it once from the command line (the
only place that knows argparse), the driver runs it, and `manifest.json` is it serialised.

    options = SweepOptions.from_dict(vars(args))           # as typed, names resolved
    spec = SweepSpec(options, setting="same_dataset_mnist", base=..., space=..., ...)
    run_sweep(spec, restore=False)                           # tune.driver
    manifest = build_manifest(argv, spec)                    # tune.manifest

`SweepOptions` are the command-line options as given (after `--resume` filled the left-out ones
from the manifest); `SweepSpec` adds what they resolve to: the RunConfig, the search space, the
partitions, the OOD-set layout, the backbone, the first point.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cmg.backbone import BackboneSpec
from cmg.config import RunConfig, apply_overrides
from cmg.errors import fail
from cmg.results import ARM_PREFIX, STUDY_JOURNAL, is_uri
from tune.space import Param, arm_space, first_point


@dataclass(frozen=True)
class SweepOptions:
    """`python -m tune.sweep`'s options, one field per option (its argparse name); the defaults
    live in the parser, so every field is required here."""

    setting: str
    setting_modules: tuple[str, ...]
    mode: str
    # --arms: the arms (cmg.results.ARMS) swept, each its own study; None: the base's arm alone
    arms: tuple[str, ...] | None
    select_on: str  # DataConfig.val_ood of every trial: what selection sees as OOD
    budget: str
    overrides: tuple[str, ...]  # --set KEY=VALUE
    num_samples: int
    time_budget: float | None  # seconds
    storage: str  # resolved: an absolute folder or a pyarrow URI
    name: str  # resolved: SETTING-MODE-BUDGET unless given
    seed: int
    space: str | None  # the --space file
    study_storage: str | None
    scheduler: str
    gpus_per_trial: float | None  # None: resolved by tune.placement (a whole GPU, or 0)
    cpus_per_trial: float
    max_concurrent: int | None
    max_failures: int
    address: str | None
    wait_for_nodes: float  # seconds an autoscaling cluster has to bring up a node for a trial
    loggers: tuple[str, ...]
    prewarm: bool
    data_root: str  # resolved: where every trial reads the data
    # --data-root as typed (None: the default, $CMG_DATA_ROOT or ./datasets): what the report's
    # reproduce line shows, so that it names no folder of the machine the sweep ran on
    data_root_given: str | None
    download: bool
    ood_dataset: str
    backbone: str | None  # the --backbone path
    backbone_format: str
    compile: bool
    report: bool
    quiet: bool

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "SweepOptions":
        """The fields of `options` (e.g. `vars(args)`; other keys, like `resume`, are ignored);
        lists become tuples, so the object stays hashable and frozen."""
        return cls(**{f.name: tuple(v) if isinstance(v := options[f.name], list) else v
                      for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (manifest.json's "options")."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: its options and what they resolve to."""

    options: SweepOptions
    setting: str  # the registered setting's name (a MODULE:NAME setting: NAME)
    modules: tuple[str, ...]  # setting modules every trial imports (a MODULE:NAME's MODULE too)
    partitions: tuple[int, ...]
    modes: tuple[str, ...]  # the modes searched (--mode both: two)
    base: RunConfig  # the budget's RunConfig with the seed and every --set
    space: dict[str, Param]  # the searched knobs, after --space (on resume: the manifest's)
    first: dict[str, Any]  # the first point: the reference's defaults
    ood_sets: tuple[tuple[str, int, int], ...] = ()  # Setting 2: the OOD sets found, their layout
    backbone: BackboneSpec | None = None  # an external model in place of the stage-1 classifier

    @property
    def experiment(self) -> str:
        """STORAGE/NAME: the experiment folder or URI."""
        return "/".join([self.options.storage.rstrip("/"), self.options.name])

    @property
    def stage1_store(self) -> str:
        """STORAGE/stage1: the stage-1 models, shared by every sweep on this storage."""
        return "/".join([self.options.storage.rstrip("/"), "stage1"])

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms swept (stage2.pseudo_ood), CMG's own first: each arm's study is `arm(a)`."""
        return self.options.arms or (self.base.stage2.pseudo_ood,)

    def arm(self, arm: str) -> "SweepSpec":
        """The study of one arm: the sweep itself for CMG's own arm (the base's), else a
        sub-experiment STORAGE/NAME/arm-ARM (study NAME/arm-ARM) with the same options (budget,
        configurations, sampler seed, scheduler, stage-1 store), the arm set in the base config,
        and only the knobs that act on it (tune.space.arm_space)."""
        if arm == self.base.stage2.pseudo_ood:
            return self
        base = apply_overrides(self.base, {"stage2.pseudo_ood": arm})
        space = arm_space(self.space, arm)
        return dataclasses.replace(
            self, options=dataclasses.replace(self.options, arms=None,
                                              name=f"{self.options.name}/{ARM_PREFIX}{arm}"),
            base=base, space=space, first=first_point(space, base, self.modes))

    def study_storage(self):
        """The Optuna storage: --study-storage, else a journal file in the experiment folder."""
        return open_study_storage(self.options.study_storage, self.experiment)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: manifest.json holds this and where and how the sweep was launched."""
        return {"options": self.options.to_dict(), "setting": self.setting,
                "modules": list(self.modules), "partitions": list(self.partitions),
                "modes": list(self.modes), "run_config": self.base.to_dict(),
                "space": {name: dataclasses.asdict(p) for name, p in self.space.items()},
                "first": dict(self.first), "ood_sets": [list(s) for s in self.ood_sets],
                "backbone": dataclasses.asdict(self.backbone) if self.backbone else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        """`to_dict`'s inverse (a manifest.json of format 2 loads into the spec that wrote it)."""
        return cls(options=SweepOptions.from_dict(d["options"]), setting=d["setting"],
                   modules=tuple(d["modules"]), partitions=tuple(d["partitions"]),
                   modes=tuple(d["modes"]), base=RunConfig.from_dict(d["run_config"]),
                   space=space_from_dict(d["space"]), first=dict(d["first"]),
                   ood_sets=tuple(tuple(s) for s in d["ood_sets"]),
                   backbone=BackboneSpec(**d["backbone"]) if d["backbone"] else None)


def space_from_dict(space: dict[str, dict]) -> dict[str, Param]:
    """A search space as `SweepSpec.to_dict` writes it (JSON lists back to Param's tuples)."""
    return {name: Param(**{**p, "choices": None if p["choices"] is None else tuple(p["choices"])})
            for name, p in space.items()}


def open_study_storage(url: str | None, experiment: str):
    """Optuna storage at URL (an RDB URL), else EXPERIMENT/optuna.journal; a bad URL or a remote
    experiment without one is a one-line UsageError."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # bad URL, missing driver, unreachable server
            fail(f"cannot open study storage {url} ({type(err).__name__}); check --study-storage")
    if is_uri(experiment):
        fail("--storage is remote: pass --study-storage URL (e.g. postgresql://...) for the study")
    return JournalStorage(JournalFileBackend(os.path.join(experiment, STUDY_JOURNAL)))
