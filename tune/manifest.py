"""EXPERIMENT/manifest.json: the one record of a sweep. It is the sweep's spec
(tune.spec.SweepSpec.to_dict: every resolved option, the search space actually used, the
budget's resolved RunConfig, the partitions, modes, first point, OOD sets and backbone) plus
where and how it was launched: the command line, the time, the versions of torch, ray, optuna
and this package, the git commit and whether the tree was dirty (when the code runs from a git
checkout), the host's devices, and each resume. Written before the first trial; every reader
(--resume, tune.replicate, tune.export, analysis) reads it.

    manifest = build_manifest(argv, spec)                  # tune.sweep, before the first trial
    ArtifactStore(storage).write_json(name, MANIFEST, manifest)
    spec = spec_from_manifest(manifest)                    # the SweepSpec that wrote it
    options = with_manifest_defaults(vars(args), given, manifest)      # on --resume
    differences(manifest, spec)  # [] or ["--seed 0 -> 1", "search space: sigma"]
    arm_manifest(manifest, spec, "none")  # EXPERIMENT/arm-none/manifest.json (tune.sweep --arms)

On --resume, an option left out is taken from the manifest (so `--resume --storage S --name X`
alone continues a sweep); one given must match it, except the options in FREE (where to run,
what to print), --num-samples and --arms, which may grow. Manifests written before the spec was
whole (format 1: options, space and RunConfig only) load too: the rest is resolved from the
options, as the sweep resolved it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cmg.config import RunConfig, resolve_family_defaults
from cmg.data import get_setting
from cmg.results import MANIFEST_FORMAT, NotAnExperiment
from tune.spec import SweepOptions, SweepSpec, space_from_dict

PACKAGE = "cmg-sweep"
ROOT = Path(__file__).resolve().parents[1]
# options that may change between runs of one sweep: where and how long it runs, what it prints
# and where it sends its metrics
FREE = {"storage", "name", "address", "data_root", "data_root_given", "download", "prewarm",
        "report", "quiet", "num_samples", "time_budget", "loggers", "wait_for_nodes"}
# options a manifest written before they existed lacks, with what a sweep then did
ADDED_OPTIONS = {"data_root_given": None,  # (select_on: the run config's data.val_ood)
                 "arms": None, "wait_for_nodes": 1200.0}
# compared through what they resolve to (the space, the RunConfig, the arms), not as typed
RESOLVED = {"space", "overrides", "arms"}


def spec_from_manifest(manifest: dict[str, Any]) -> SweepSpec:
    """The SweepSpec a manifest records (format 1: resolved from its options as the sweep did);
    NotAnExperiment for a format this version does not know."""
    version = manifest.get("format", 1)
    if version == MANIFEST_FORMAT:  # options added since format 2 began take their old meaning
        return SweepSpec.from_dict({**manifest, "options": {**ADDED_OPTIONS,
                                                            **manifest["options"]}})
    if version != 1:
        raise NotAnExperiment(f"manifest.json has format {version}; this cmg-sweep reads "
                              f"formats 1 and {MANIFEST_FORMAT}: upgrade it")
    from cmg.backbone import BackboneSpec
    from cmg.data import load_setting, setting_modules
    from tune.space import first_point, mode_choices

    base = RunConfig.from_dict(manifest["run_config"])
    options = SweepOptions.from_dict({"select_on": base.data.val_ood, **ADDED_OPTIONS,
                                      **manifest["options"]})
    setting = load_setting(options.setting, options.setting_modules)
    base = resolve_family_defaults(base, setting.family)  # format 1 left sigma None
    modes, space = mode_choices(options.mode), space_from_dict(manifest["space"])
    partitions = tuple(manifest["partitions"])
    backbone = (BackboneSpec.from_args(options.backbone, options.backbone_format, partitions)
                if options.backbone else None)
    return SweepSpec(options, setting=setting.name,
                     modules=setting_modules(options.setting, options.setting_modules),
                     partitions=partitions, modes=modes, base=base, space=space,
                     first=first_point(space, base, modes),
                     ood_sets=tuple(tuple(s) for s in manifest["ood_sets"]), backbone=backbone)


def _git() -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _versions() -> dict[str, str | None]:
    out = {}
    for package in ("torch", "ray", "optuna", PACKAGE):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _host() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"hostname": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "gpus": gpus}


def build_manifest(argv: list[str], spec: SweepSpec) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, **spec.to_dict(),
            "command": shlex.join([Path(sys.executable).name, "-m", "tune.sweep", *argv]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(), "git": _git(), "host": _host(), "resumed": []}


def arm_manifest(manifest: dict[str, Any], spec: SweepSpec, arm: str) -> dict[str, Any]:
    """The manifest.json of one arm's study (EXPERIMENT/arm-ARM, tune.sweep --arms): the sweep's,
    its spec replaced by the arm's (SweepSpec.arm: its name, base config, space, first point) and
    `arm_of` naming the sweep, so that every reader of an experiment (analysis, tune.replicate,
    tune.export) reads the arm's folder as one. Written from the sweep's manifest each time that
    is written; the arm is continued through the sweep, never on its own."""
    return {**manifest, **spec.arm(arm).to_dict(), "arm_of": spec.options.name}


def with_manifest_defaults(options: dict[str, Any], given: set[str],
                           manifest: dict) -> dict[str, Any]:
    """`options` with every one not `given` taken from the manifest (on --resume)."""
    return {**options, **{k: v for k, v in manifest["options"].items()
                          if k not in given and k in options}}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(manifest: dict, spec: SweepSpec) -> list[str]:
    """What a resume would change: option, search space or RunConfig differences, each named."""
    out = []
    before, now = manifest["options"], spec.options.to_dict()
    for key, value in sorted(now.items()):
        if key in FREE | RESOLVED or key not in before or before[key] == value:
            continue
        out.append(f"--{key.replace('_', '-')} {before[key]} -> {value}")
    if now["num_samples"] < before.get("num_samples", 0):
        out.append(f"--num-samples {before['num_samples']} -> {now['num_samples']} (it may only "
                   "grow)")
    arms = manifest_arms(manifest)
    if not set(arms) <= set(spec.arms):
        out.append(f"--arms {','.join(arms)} -> {','.join(spec.arms)} (arms may only be added)")
    old_space, new_space = manifest["space"], spec.to_dict()["space"]
    changed = sorted(k for k in old_space.keys() | new_space.keys()
                     if _jsonish(old_space.get(k)) != _jsonish(new_space.get(k)))
    if changed:
        out.append(f"search space: {', '.join(changed)}")
    # a format-1 manifest left the family's defaults (sigma) None: compare what they resolve to
    old = resolve_family_defaults(RunConfig.from_dict(manifest["run_config"]),
                                  get_setting(spec.setting).family)
    old_cfg, new_cfg = _flat(_jsonish(old.to_dict())), _flat(_jsonish(spec.base.to_dict()))
    changed = sorted(k for k in old_cfg.keys() | new_cfg.keys() if old_cfg.get(k) != new_cfg.get(k))
    if changed:
        out.append("run config: " + ", ".join(f"{k} {old_cfg.get(k)} -> {new_cfg.get(k)}"
                                              for k in changed))
    return out


def manifest_arms(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The arms a manifest's sweep searched (SweepSpec.arms): --arms, else its base's arm."""
    return tuple(manifest["options"].get("arms")
                 or [manifest["run_config"]["stage2"].get("pseudo_ood", "mixed")])


def _jsonish(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
