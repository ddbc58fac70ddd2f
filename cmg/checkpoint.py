"""Checkpoints: one file per model with its weights, config and training state.

Files are written atomically and read with `torch.load(weights_only=True)`: a checkpoint holds
only tensors and plain Python values, so loading one never runs code from the file.

    save_checkpoint(path, {"kind": "classifier", "model": model.state_dict(), ...})
    state = load_checkpoint(path, kind="classifier")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cmg.errors import atomic_write, fail

FORMAT = "cmg-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load a cmg checkpoint on the CPU; a missing, corrupt or wrong-kind file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint {path} does not exist; train it first (python -m cmg.train ...) "
             "or fix the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        fail(f"checkpoint {path} is corrupt or not a cmg checkpoint ({reason}); "
             "delete it and train again")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fail(f"checkpoint {path} is not a cmg checkpoint; train one with python -m cmg.train")
    if state.get("version") != VERSION:
        fail(f"checkpoint {path} has format version {state.get('version')}, this cmg reads "
             f"{VERSION}; train it again")
    if kind is not None and state.get("kind") != kind:
        fail(f"checkpoint {path} holds a {state.get('kind')}, not a {kind}; "
             "check the order of the checkpoint arguments")
    return state


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike,
                           what: str = "checkpoint",
                           fix: str = "was it trained for another setting?") -> None:
    """Strict load with a one-line error listing the first mismatched keys (`what` names the
    file's role, `fix` says what to check)."""
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
    if missing or unexpected:
        fail(f"{what} {path} does not match the model: missing keys {missing[:4]}, "
             f"unexpected keys {unexpected[:4]}; {fix}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        fail(f"{what} {path} does not match the model ({str(err).splitlines()[-1].strip()[:160]}); "
             "was it trained with another latent size or head width?")
