"""Options shared by the command lines (`cmg.run`, `cmg.train`, `cmg.eval`, `tune.sweep`), each
declared once here, and the summary table."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from cmg.backbone import FORMATS as BACKBONE_FORMATS
from cmg.backbone import BackboneSpec
from cmg.config import BUDGET_NOTES, BUDGETS, MODES, RunConfig, budget_config, seed_overrides
from cmg.results import BASELINES
from cmg.data import OOD_LOADERS, Setting, load_setting, parse_partition, setting_names
from cmg.errors import add_quiet_arg, atomic_write, fail


def add_setting_args(p: argparse.ArgumentParser) -> None:
    """--setting (a registered name or MODULE:NAME) and --setting-module."""
    p.add_argument("--setting", default="same_dataset_mnist",
                   help=f"data setting: {', '.join(setting_names())}, or MODULE:NAME for one that "
                        "MODULE registers (see cmg/data/settings.py)")
    p.add_argument("--setting-module", dest="setting_modules", action="append", default=[],
                   metavar="MODULE", help="import MODULE (which registers settings) before "
                                          "looking up --setting; repeatable")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """--budget and --set: which RunConfig (cmg/config.py) a command builds."""
    notes = "; ".join(f"{name}: {BUDGET_NOTES[name]}" for name in BUDGETS)
    p.add_argument("--budget", default="quick", choices=list(BUDGETS),
                   help=f"how much work per partition ({notes})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any knob, e.g. --set stage2.sigma=4 --set classifier.epochs=3 "
                        "(repeatable; keys and types in cmg/config.py)")


def add_data_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $CMG_DATA_ROOT, else ./datasets)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, or auto (cuda when available)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--data-root and --download: where the images are."""
    add_data_root_arg(p)
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing data sets first (needs internet)")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options of every cmg command: budget, overrides, seed, device, data, quiet."""
    add_budget_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every model and of generation")
    add_device_arg(p)
    add_data_args(p)
    add_quiet_arg(p)


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, metavar="PATH",
                   help="a pretrained model that replaces the stage-1 classifier (stage 1 then "
                        "trains only the CVAE); see --backbone-format")
    p.add_argument("--backbone-format", default="cmg", choices=list(BACKBONE_FORMATS),
                   help="cmg: a cmg.train classifier checkpoint; csi: CSI's labelled CIFAR "
                        "ResNet-18 state dict (its own linear head is fine-tuned); torchvision: a "
                        "resnet18 state dict (a new head is trained)")


def backbone_from_args(args: argparse.Namespace,
                       partitions: tuple[int, ...] = (1,)) -> BackboneSpec | None:
    """`partitions`: those the command runs (a `{partition}` in the path names their files)."""
    return (BackboneSpec.from_args(args.backbone, args.backbone_format, tuple(partitions))
            if args.backbone else None)


def add_ood_dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ood-dataset", default="all",
                   help="different_dataset only: OOD test sets, comma-separated from "
                        f"{', '.join(OOD_LOADERS)}, or all (those present; missing ones are "
                        "skipped with a warning)")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stage-1 training steps: compiling takes tens of "
                        "seconds per network, so it pays on long trainings (paper budget); "
                        "does not change what is trained (not part of a stage-1 model's key)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {name} asked for but CUDA is not available here; use --device cpu")
    return device


def config_from_args(args: argparse.Namespace, family: str, mode: str | None = None) -> RunConfig:
    seeds = seed_overrides(args.seed)
    extra = [f"stage2.mode={mode}"] if mode is not None else []
    return budget_config(args.budget, family, seeds + extra + list(args.overrides))


def setup_run(args: argparse.Namespace, setting_name: str, partition_text: str,
              mode: str | None = None,
              modules: tuple[str, ...] = ()) -> tuple[Setting, int, RunConfig, torch.device]:
    """Validate setting (after importing `modules`), partition and mode; build the config and
    pick the device."""
    setting = load_setting(setting_name, modules)
    partition = parse_partition(partition_text)
    setting.ind_classes(partition)
    if mode is not None and mode not in MODES:
        fail(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    return setting, partition, config_from_args(args, setting.family, mode), resolve_device(args.device)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A small table: CMG beside the baselines (cmg.results.BASELINES), validation and test."""
    b = metrics["baselines"]
    rows = [("CMG (" + metrics["mode"] + ")", metrics["val"], metrics["test"]),
            *((label, b[key]["val"], b[key]["test"]) for key, label in BASELINES.items())]
    lines = [f"{metrics['setting']} partition {metrics['partition']}",
             f"{'score':<20} {'val AUROC':>9} {'test AUROC':>10} {'AUPR-in':>8} "
             f"{'AUPR-out':>8} {'FPR95':>6} {'IND acc':>7}"]
    for name, val, test in rows:
        lines.append(f"{name:<20} {val['auroc']:9.4f} {test['auroc']:10.4f} "
                     f"{test['aupr_in']:8.4f} {test['aupr_out']:8.4f} {test['fpr95']:6.3f} "
                     f"{test['ind_acc']:7.4f}")
    if "ood_sets" in metrics["test"]:  # Setting 2: the rows above are means over the OOD sets
        sets = list(metrics["test"]["ood_sets"])
        lines.append("test AUROC per OOD set: " + f"{'':<9}" + " ".join(f"{s:>12}" for s in sets))
        for name, _, test in rows:
            lines.append(f"{name:<33}" + " ".join(
                f"{test['ood_sets'][s]['auroc']:12.4f}" for s in sets))
        if metrics.get("skipped_ood_sets"):
            lines.append(f"skipped (not found): {', '.join(metrics['skipped_ood_sets'])}")
    return lines
