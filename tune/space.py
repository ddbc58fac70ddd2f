"""The search space of a sweep: one home for what is searched, its ranges and its first point.

Each parameter maps to one knob of `cmg.config.RunConfig`. The space is define-by-run (Optuna),
so conditional knobs are only drawn when they matter: `mask_prob` only for mask mixing; the
energy weight and margin percentiles only for CMG-energy. The first trial is the reference's
defaults (`first_point`), taken from `cmg.config`, never restated here.

A sweep over several arms (`tune.sweep --arms`, cmg.results.ARMS) searches, in each arm's study,
only the knobs that act on that arm (`arm_space`): a knob the arm's training ignores would spend
its budget on draws that change nothing.

A YAML file (`--space FILE.yaml`) overrides ranges or fixes values::

    sigma: {low: 1.0, high: 4.0, log: true}   # a new range
    num_mixed: 2                              # fixed: not searched
    mixing: {choices: [mask, convex]}
    latent_dim: {choices: [16, 32]}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cmg.config import MODES, RunConfig, apply_overrides
from cmg.errors import UsageError, fail
from cmg.results import ARMS


@dataclass(frozen=True)
class Param:
    key: str  # dotted key of cmg.config.RunConfig
    kind: str  # "float", "int" or "cat"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    fixed: Any = None  # set by a space file: not searched
    only_for: str | None = None  # "CMG-energy" / "mask": drawn only in that case

    @property
    def is_fixed(self) -> bool:
        return self.fixed is not None


def default_space(cfg: RunConfig) -> dict[str, Param]:
    """The searched knobs; stage-2 epoch ranges scale with the budget's epochs.

    The ranges reach past where the first headline's optima sat on a bound (lr 1.2e-5 at 1e-5,
    mask_prob 0.895 at 0.9, energy_weight 0.013 at 0.01, sigma 0.64 near 0.5; README Results):
    mask_prob up to 1.0 (every condition one class: the search may switch mixing off), num_mixed
    up to 5, m_in_percentile up to 72.5 (analysis/edges.py's half-width widening)."""
    epochs = cfg.stage2.epochs
    return {
        "mixing": Param("stage2.mixing", "cat", choices=("mask", "convex")),
        "mask_prob": Param("stage2.mask_prob", "float", 0.1, 1.0, only_for="mask"),
        "num_mixed": Param("stage2.num_mixed", "int", 2, 5),
        "distinct": Param("stage2.distinct", "cat", choices=(True, False)),
        "sigma": Param("stage2.sigma", "float", 0.25, 8.0, log=True),
        "energy_weight": Param("stage2.energy_weight", "float", 1e-3, 1.0, log=True,
                               only_for="CMG-energy"),
        "m_in_percentile": Param("stage2.m_in_percentile", "float", 5.0, 72.5,
                                 only_for="CMG-energy"),
        "m_out_percentile": Param("stage2.m_out_percentile", "float", 50.0, 95.0,
                                  only_for="CMG-energy"),
        "lr": Param("stage2.lr", "float", 1e-6, 1e-3, log=True),
        "epochs": Param("stage2.epochs", "int", max(1, epochs // 3), max(2, 2 * epochs)),
        "ood_per_batch": Param("stage2.ood_per_batch", "cat", choices=(32, 64, 128, 256)),
        "latent_dim": Param("cvae.latent_dim", "cat", choices=(16, 32, 64)),
    }


# What each arm's training ignores (cmg.stage2, cmg.generate): "single" decodes one class per
# condition (no mixing); "noise" draws uniform images (no CVAE, so no sigma or latent size);
# "none" trains on IND cross-entropy alone (no pseudo-OOD: no energy loss, margins or batch of it)
MIXING_KNOBS = ("mixing", "mask_prob", "num_mixed", "distinct")
DECODER_KNOBS = ("sigma", "latent_dim")
PSEUDO_OOD_KNOBS = ("energy_weight", "m_in_percentile", "m_out_percentile", "ood_per_batch")
IGNORED_BY_ARM = {"mixed": (), "single": MIXING_KNOBS, "noise": MIXING_KNOBS + DECODER_KNOBS,
                  "none": MIXING_KNOBS + DECODER_KNOBS + PSEUDO_OOD_KNOBS}


def arm_space(space: dict[str, Param], arm: str) -> dict[str, Param]:
    """The knobs of `space` that act on `arm` (its study's space): the head-only arm keeps lr and
    epochs, the noise arm loses mixing, sigma and the latent size, the unmixed arm mixing."""
    return {name: p for name, p in space.items() if name not in IGNORED_BY_ARM[arm]}


def arm_choices(arms: str | list[str]) -> tuple[str, ...]:
    """`--arms` ("all", or names of cmg.results.ARMS, comma-separated; a list from a manifest) as
    the arms to sweep, in ARMS order, CMG's own ("mixed") always first."""
    names = arms.split(",") if isinstance(arms, str) else list(arms)
    names = {n.strip() for n in names if n.strip()}
    if "all" in names:
        names = set(ARMS)
    if unknown := sorted(names - set(ARMS)):
        fail(f"unknown arm '{unknown[0]}' in --arms; choose from {', '.join(ARMS)} or all")
    return tuple(a for a in ARMS if a in names | {"mixed"})


def load_space_file(path: str | Path, space: dict[str, Param]) -> dict[str, Param]:
    """Apply a YAML space file to `space`; any problem is a one-line UsageError."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        fail(f"cannot read space file {path} ({err.strerror}); check the --space path")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        fail(f"space file {path} is not valid YAML{where}; fix the syntax")
    if not isinstance(data, dict):
        fail(f"space file {path} must map parameter names to values or ranges")
    space = dict(space)
    for name, value in data.items():
        if name not in space:
            fail(f"space file {path}: unknown parameter '{name}'; known: {', '.join(space)}")
        space[name] = _override(path, name, space[name], value)
    return space


def check_fixed(path: str | Path, space: dict[str, Param], base: RunConfig) -> None:
    """A space file's fixed values must make a valid config (e.g. `num_mixed: 0` would fail
    every trial): checked once, with the config's own rules, before the sweep starts."""
    for name, param in space.items():
        if param.is_fixed:
            try:
                apply_overrides(base, {param.key: param.fixed})
            except UsageError as err:
                fail(f"space file {path}: '{name}: {param.fixed}' is not a valid value ({err})")


def _override(path: Path, name: str, param: Param, value: Any) -> Param:
    if not isinstance(value, dict):
        return replace(param, fixed=value)
    if set(value) == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
        return replace(param, kind="cat", choices=tuple(value["choices"]), fixed=None)
    if {"low", "high"} <= set(value) <= {"low", "high", "log"} and param.kind != "cat":
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) for v in (low, high)) or low > high or (
                value.get("log") and low <= 0):
            fail(f"space file {path}: '{name}' needs numbers with low <= high (and low > 0 "
                 "for log)")
        return replace(param, low=low, high=high, log=bool(value.get("log", param.log)),
                       fixed=None)
    fail(f"space file {path}: '{name}' must be a value, {{low: .., high: .., log: ..}}"
         + (", " if param.kind != "cat" else " or ") + "{choices: [..]}")


def mode_choices(mode: str) -> tuple[str, ...]:
    if mode == "both":
        return MODES
    if mode not in MODES:
        fail(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}, both")
    return (mode,)


def suggest(trial, space: dict[str, Param], modes: tuple[str, ...]) -> dict[str, Any]:
    """Optuna define-by-run: draw the active parameters; returns the fixed ones (Ray adds them)."""
    fixed: dict[str, Any] = {}
    mode = trial.suggest_categorical("mode", list(modes)) if len(modes) > 1 else modes[0]
    if len(modes) == 1:
        fixed["mode"] = mode
    mixing = None
    for name, p in space.items():
        if p.only_for is not None and p.only_for not in (mode, mixing):
            continue
        if p.is_fixed:
            value = fixed[name] = p.fixed
        elif p.kind == "cat":
            value = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            value = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            value = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
        if name == "mixing":
            mixing = value
    return fixed


def first_point(space: dict[str, Param], cfg: RunConfig, modes: tuple[str, ...]) -> dict[str, Any]:
    """The reference defaults (from `cfg`, as `cmg.config.budget_config` built it: the family's
    sigma included) for every searched, active parameter; the first of `modes` if several."""
    mode = modes[0]
    point: dict[str, Any] = {"mode": mode} if len(modes) > 1 else {}
    mixing = cfg.stage2.mixing
    for name, p in space.items():
        if p.is_fixed or (p.only_for is not None and p.only_for not in (mode, mixing)):
            continue
        section, _, field = p.key.partition(".")
        value = getattr(getattr(cfg, section), field)
        if value is None:
            raise ValueError(f"{p.key} is None in the base config; build it with "
                             "cmg.config.budget_config, which resolves the family's defaults")
        inside = (value in p.choices if p.kind == "cat"
                  else p.low <= value <= p.high)
        if inside:  # a range that excludes the reference value leaves it to the sampler
            point[name] = value
    return point


def to_overrides(params: dict[str, Any], space: dict[str, Param]) -> dict[str, Any]:
    """Trial parameters -> dotted RunConfig overrides."""
    out = {"stage2.mode": params["mode"]}
    for name, value in params.items():
        if name in space:
            out[space[name].key] = value
    return out
