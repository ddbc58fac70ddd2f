"""Every knob of CMG in one place: typed configs, the reference defaults and the budgets.

The dataclass defaults ARE the reference implementation's defaults (docs/design.md), except where
a known defect of the reference is fixed on purpose (noted beside the field). A budget
(`smoke`, `quick`, `paper`) changes only how much work is done, and any field can still be
overridden with a dotted key::

    cfg = budget_config("quick", overrides=["stage2.sigma=4", "classifier.epochs=3"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable

from cmg.errors import fail
from cmg.results import ARMS

MODES = ("CMG-energy", "CMG-softmax")


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage 1: the IND classifier (feature extractor + MLP head)."""

    epochs: int = 100  # reference: 100 (MNIST); `paper` budget sets 200 for CIFAR
    batch_size: int = 512
    lr: float = 1e-3
    schedule: str = "constant"  # "constant" (reference) or "onecycle"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    head_width: int = 512
    input_dropout: bool = False  # defect 5: the reference drops whole MNIST inputs (True restores it)
    seed: int = 0
    amp: bool = True  # bf16 autocast: training on CUDA; frozen inference on CUDA and bf16 CPUs


@dataclass(frozen=True)
class CVAEConfig:
    """Stage 1: the conditional VAE that stage 2 samples pseudo-OOD images from."""

    epochs: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    schedule: str = "constant"
    latent_dim: int = 32
    embed_dim: int | None = None  # the decoder's class embedding; None: latent_dim (the reference)
    hidden: int = 1024
    kl_weight: float = 1.0
    seed: int = 0
    amp: bool = True


# The reference's std of z at generation, by model family: the one home of this table. A config
# gets its entry when it is built (`budget_config`, through `resolve_family_defaults`).
DEFAULT_SIGMA = {"mnist": 3.0, "cifar": 5.0}


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: class-mixed generation and fine-tuning of the classifier head."""

    mode: str = "CMG-energy"
    # std of z at generation. None: not resolved yet; `budget_config` (resolve_family_defaults)
    # sets DEFAULT_SIGMA of the family, so a built config, and its trial.json, holds the value used
    sigma: float | None = None
    mixing: str = "mask"  # "mask": per-coordinate pick (reference); "convex": Dirichlet weights
    mask_prob: float = 0.5  # probability that a coordinate comes from the first mixed class
    num_mixed: int = 2  # classes mixed per pseudo-OOD sample
    distinct: bool = True  # defect 3: the reference allows i == j (False restores it)
    ood_per_batch: int = 128
    batch_size: int = 128
    lr: float = 1e-4
    epochs: int = 15
    energy_weight: float = 0.1
    m_in_percentile: float = 20.0
    m_out_percentile: float = 80.0
    m_in: float | None = None  # a fixed margin overrides the percentile
    m_out: float | None = None
    # label smoothing of the IND cross-entropy (over the K IND classes, as stage 1's). None: stage
    # 1's `classifier.label_smoothing`, resolved when the config is built (resolve_family_defaults),
    # so that re-training the head does not undo stage 1's smoothing, which by itself moves
    # max-logit-type scores and would pass for an effect of the pseudo-OOD
    label_smoothing: float | None = None
    # what the head trains against: "mixed" (CMG), or a control arm on the same stage-1 models:
    # "single" (one class per condition), "noise" (uniform images), "none" (no pseudo-OOD: the
    # head re-trained on IND cross-entropy alone). Names: cmg.results.ARMS
    pseudo_ood: str = "mixed"
    train_layers: str = "head"  # "head": the whole MLP head (reference); "last": its last layer
    select: str = "val"  # keep the epoch with the best validation AUROC ("val") or the "last"
    seed: int = 0


VAL_OOD = ("unseen", "rotated")  # DataConfig.val_ood: what selection sees as OOD


@dataclass(frozen=True)
class DataConfig:
    """How much of a setting is used. None = everything."""

    train_limit: int | None = None  # IND training images (a seeded, class-balanced subset)
    eval_limit: int | None = None  # images per evaluation part (val IND, val OOD, test IND, ...)
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = True  # crop + flip for the CIFAR classifier (no-op for MNIST)
    # what selection sees as OOD (Setting 1): "unseen", held-out training images of the test's
    # OOD classes; "rotated", the IND validation images rotated by 90, 180 or 270 degrees (no
    # image of an unseen class before the test). cmg.data.split, VAL_OOD
    val_ood: str = "unseen"


@dataclass(frozen=True)
class RunConfig:
    """Everything one partition's pipeline needs. `budget_config` builds one."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A config as `to_dict` wrote it. A record from before `stage2.label_smoothing` existed
        gets 0.0: its stage 2 trained without smoothing."""
        stage2 = {"label_smoothing": 0.0, **d["stage2"]}
        return cls(**{name: kind(**(stage2 if name == "stage2" else d[name]))
                      for name, kind in SECTIONS.items()})


SECTIONS = {"classifier": ClassifierConfig, "cvae": CVAEConfig, "stage2": Stage2Config,
            "data": DataConfig}


_QUICK = {
    "classifier.epochs": 2, "classifier.batch_size": 128, "classifier.lr": 3e-3,
    "classifier.schedule": "onecycle", "classifier.label_smoothing": 0.1,
    "cvae.epochs": 12, "cvae.batch_size": 128, "cvae.lr": 2e-3,
    "stage2.epochs": 3, "data.train_limit": 6000, "data.eval_limit": 2000,
}

# What each budget is for (shown by every command's --budget help).
BUDGET_NOTES = {
    "smoke": "seconds, for tests",
    "quick": "minutes per partition on a CPU",
    "demo": "a whole sweep on 2 CPU cores in minutes",
    "paper": "the reference's epochs, all the data",
}

# `budget`: per (budget, model family) overrides of the reference defaults. "mnist" and "cifar" are
# the two model families; a setting names its family. Only work amounts and recipes change here.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    # seconds on a CPU: for tests and CI, not for numbers
    "smoke": {
        "*": {
            "classifier.epochs": 1, "classifier.batch_size": 64, "cvae.epochs": 1,
            "cvae.batch_size": 64, "stage2.epochs": 1, "stage2.batch_size": 64,
            "stage2.ood_per_batch": 64, "data.train_limit": 384, "data.eval_limit": 96,
        },
    },
    # a few minutes per partition on 2 CPU cores, meaningful AUROC on MNIST: a one-cycle recipe
    # with a larger learning rate and label smoothing gets far in few epochs
    "quick": {"*": _QUICK},
    # the README's demo sweep: the quick recipe on less data, a whole sweep on 2 CPU cores in minutes
    "demo": {"*": {**_QUICK, "cvae.epochs": 8, "stage2.epochs": 2, "stage2.ood_per_batch": 64,
                   "data.train_limit": 2400, "data.eval_limit": 1000}},
    # the reference's epochs and batch sizes, all the data
    "paper": {
        "mnist": {},
        "cifar": {"classifier.epochs": 200, "cvae.epochs": 200},
    },
}


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _field_type(section: type, name: str) -> tuple[type, bool]:
    """(the field's base type, whether it also takes None) from its annotation."""
    hint = typing.get_type_hints(section)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), len(args) < len(typing.get_args(hint))


def _parse_value(key: str, raw: Any, kind: type, optional: bool) -> Any:
    """`raw` (text from --set, or a value from a budget or the search space) as the field's type;
    a value that does not fit is a one-line error naming the key, the type and the value."""
    if isinstance(raw, str):
        text = raw.strip()
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is str:
            return text
        try:
            if kind is bool:
                return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
            return kind(text)
        except (KeyError, ValueError):
            pass
    elif raw is None and optional:
        return None
    elif kind is bool and isinstance(raw, bool):
        return raw
    elif kind is int and isinstance(raw, (int, float)) and not isinstance(raw, bool) \
            and float(raw).is_integer():
        return int(raw)
    elif kind is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    expected = _TYPE_NAMES[kind] + (" or none" if optional else "")
    fail(f"{key} takes {expected}, not '{raw}' (field types: cmg/config.py)")


def seed_overrides(seed: int) -> list[str]:
    """The overrides that seed every model of a run: stage 1 (classifier, CVAE) and stage 2."""
    return [f"{stage}.seed={seed}" for stage in ("classifier", "cvae", "stage2")]


def with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    """`cfg` with every model seeded by `seed` (tune.replicate's runs, their stage-1 models)."""
    return apply_overrides(cfg, seed_overrides(seed))


def cell_seed(seed: int, partition: int) -> int:
    """The seed of one (seed, partition) cell of a replication: a hash of both, so that no two
    cells share initial weights, batch order or split (a seed used on every partition would)."""
    digest = hashlib.sha256(f"cmg-cell:{seed}:{partition}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def cell_config(cfg: RunConfig, partition: int) -> RunConfig:
    """`cfg` (seeded by `with_seed`) for one partition of a replication: every model and the
    train/validation split seeded by `cell_seed(its seed, partition)`."""
    seed = cell_seed(cfg.classifier.seed, partition)
    return apply_overrides(with_seed(cfg, seed), {"data.split_seed": seed})


def apply_overrides(cfg: RunConfig, overrides: Iterable[str] | dict[str, Any]) -> RunConfig:
    """Return `cfg` with dotted-key overrides applied ("stage2.sigma=4" or {"stage2.sigma": 4})."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    sections = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for key, raw in items:
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in fields(sections[section])}:
            fail(f"unknown setting key '{key}'; known keys look like "
                 f"'classifier.epochs' or 'stage2.sigma' (see cmg/config.py)")
        value = _parse_value(key, raw, *_field_type(type(sections[section]), name))
        sections[section] = replace(sections[section], **{name: value})
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        fail(f"override '{item}' is not KEY=VALUE, e.g. --set stage2.sigma=4")
    return key.strip(), value.strip()


def budget_config(budget: str, family: str = "mnist", overrides=()) -> RunConfig:
    """The RunConfig of a named budget for a model family ("mnist" or "cifar"), plus overrides,
    with the family's defaults filled in (`resolve_family_defaults`): every value it holds is the
    value used."""
    if budget not in BUDGETS:
        fail(f"unknown budget '{budget}'; choose one of {', '.join(BUDGETS)}")
    merged = {**BUDGETS[budget].get("*", {}), **BUDGETS[budget].get(family, {})}
    return resolve_family_defaults(apply_overrides(apply_overrides(RunConfig(), merged), overrides),
                                   family)


def resolve_family_defaults(cfg: RunConfig, family: str) -> RunConfig:
    """`cfg` with each knob whose default is not a constant, and that is still None, set to it:
    stage2.sigma <- DEFAULT_SIGMA[family], stage2.label_smoothing <- classifier.label_smoothing.
    A value already set (an override) is kept. The one place such a default is resolved;
    `budget_config` calls it."""
    if family not in DEFAULT_SIGMA:
        fail(f"unknown model family '{family}'; choose one of {', '.join(DEFAULT_SIGMA)}")
    s2 = cfg.stage2
    return replace(cfg, stage2=replace(
        s2, sigma=DEFAULT_SIGMA[family] if s2.sigma is None else s2.sigma,
        label_smoothing=(cfg.classifier.label_smoothing if s2.label_smoothing is None
                         else s2.label_smoothing)))


def validate(cfg: RunConfig) -> None:
    """Reject values that would fail deep inside training with a one-line reason."""
    s2 = cfg.stage2
    checks = [
        (s2.mode in MODES, f"stage2.mode must be one of {', '.join(MODES)}"),
        (s2.mixing in ("mask", "convex"), "stage2.mixing must be 'mask' or 'convex'"),
        (s2.pseudo_ood in ARMS, f"stage2.pseudo_ood must be one of {', '.join(ARMS)}"),
        (0.0 <= s2.mask_prob <= 1.0, "stage2.mask_prob must lie in [0, 1]"),
        (s2.num_mixed >= 1, "stage2.num_mixed must be at least 1"),
        (s2.train_layers in ("head", "last"), "stage2.train_layers must be 'head' or 'last'"),
        (s2.select in ("val", "last"), "stage2.select must be 'val' or 'last'"),
        (0 <= s2.m_in_percentile <= 100 and 0 <= s2.m_out_percentile <= 100,
         "margin percentiles must lie in [0, 100]"),
        (s2.sigma is None or s2.sigma > 0, "stage2.sigma must be positive"),
        (s2.label_smoothing is None or 0.0 <= s2.label_smoothing < 1.0,
         "stage2.label_smoothing must lie in [0, 1)"),
        (cfg.classifier.schedule in ("constant", "onecycle")
         and cfg.cvae.schedule in ("constant", "onecycle"),
         "schedule must be 'constant' or 'onecycle'"),
        (0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must lie in (0, 1)"),
        (cfg.data.val_ood in VAL_OOD, f"data.val_ood must be one of {', '.join(VAL_OOD)}"),
    ]
    for sec in (cfg.classifier, cfg.cvae, s2):
        checks.append((sec.epochs >= 0 and sec.batch_size >= 1 and sec.lr > 0,
                       "epochs must be >= 0, batch_size >= 1 and lr > 0"))
    for ok, message in checks:
        if not ok:
            fail(message)
