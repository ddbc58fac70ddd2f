"""EXPERIMENT/manifest.json: the sweep's spec (tune.spec.SweepSpec) serialised with where and
how it was launched, written before its first trial, and the check that a `--resume` continues
the same sweep.

    manifest = build_manifest(argv, spec)                  # tune.sweep, before the first trial
    ArtifactStore(storage).write_json(name, MANIFEST, manifest)
    options = with_manifest_defaults(vars(args), given, manifest)      # on --resume
    differences(manifest, spec)  # [] or ["--seed 0 -> 1", "search space: sigma"]

It holds the command line, every resolved option, the search space actually used (after
--space), the budget's resolved RunConfig, the partitions and OOD sets, the versions of torch,
ray, optuna and this package, the git commit and whether the tree was dirty (when the code runs
from a git checkout) and the host's devices. On --resume, an option left out is taken from the
manifest (so `--resume --storage S --name X` alone continues a sweep); one given must match it,
except the options in FREE (where to run, what to print) and --num-samples, which may grow.
"""

from __future__ import annotations

import dataclasses
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

from tune.space import Param
from tune.spec import SweepSpec

PACKAGE = "cmg-sweep"
ROOT = Path(__file__).resolve().parents[1]
# options that may change between runs of one sweep: where and how long it runs, what it prints
# and where it sends its metrics
FREE = {"storage", "name", "address", "data_root", "download", "prewarm", "report", "quiet",
        "num_samples", "time_budget", "loggers"}
# compared through what they resolve to (the space, the RunConfig), not as typed
RESOLVED = {"space", "overrides"}


def _space_dict(space: dict[str, Param]) -> dict[str, dict]:
    return {name: dataclasses.asdict(p) for name, p in space.items()}


def space_from_manifest(manifest: dict) -> dict[str, Param]:
    """The search space a manifest recorded (JSON lists back to the tuples Param holds)."""
    return {name: Param(**{**d, "choices": None if d["choices"] is None else tuple(d["choices"])})
            for name, d in manifest["space"].items()}


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
    return {"command": shlex.join([Path(sys.executable).name, "-m", "tune.sweep", *argv]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "options": spec.options.to_dict(), "space": _space_dict(spec.space),
            "run_config": spec.base.to_dict(), "partitions": list(spec.partitions),
            "ood_sets": [list(s) for s in spec.ood_sets],
            "versions": _versions(), "git": _git(), "host": _host(), "resumed": []}


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
    old_space, new_space = manifest["space"], _space_dict(spec.space)
    changed = sorted(k for k in old_space.keys() | new_space.keys()
                     if _jsonish(old_space.get(k)) != _jsonish(new_space.get(k)))
    if changed:
        out.append(f"search space: {', '.join(changed)}")
    old_cfg, new_cfg = _flat(manifest["run_config"]), _flat(_jsonish(spec.base.to_dict()))
    changed = sorted(k for k in old_cfg.keys() | new_cfg.keys() if old_cfg.get(k) != new_cfg.get(k))
    if changed:
        out.append("run config: " + ", ".join(f"{k} {old_cfg.get(k)} -> {new_cfg.get(k)}"
                                              for k in changed))
    return out


def _jsonish(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
