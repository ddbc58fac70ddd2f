"""One partition end to end: split -> stage 1 (classifier, CVAE) -> stage 2 -> metrics dict.

    cfg = budget_config("smoke")
    split = load_partition("same_dataset_mnist", 1, cfg, "cpu")
    metrics = run_partition(split, cfg, "cpu", workdir="runs/p1")
    metrics["test"]["auroc"], metrics["baselines"]["energy"]["test"]["auroc"]

With a `workdir`, stage-1 checkpoints are kept there and a later call with the same config
resumes or reuses them instead of training again. With a `backbone` (cmg.backbone), an external
pretrained model replaces the stage-1 classifier.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from cmg.backbone import BackboneSpec
from cmg.config import RunConfig
from cmg.data import Split, get_setting, make_split
from cmg.results import BASELINES, HEAD_BASELINES, METRIC_NAMES
from cmg.stage1 import train_stage1
from cmg.stage2 import Stage2Result, run_stage2


def load_partition(setting: str, partition: int, cfg: RunConfig, device: str | torch.device,
                   data_root=None, download: bool = False,
                   ood_datasets: str | None = "all") -> Split:
    """The partition's tensors, moved to the training device once. Setting 2 warns on stderr
    about requested OOD sets that are not under the data root."""
    split = make_split(get_setting(setting), partition, cfg.data, data_root, download, ood_datasets)
    if split.skipped_ood_sets:
        print(f"warning: OOD sets not found, skipped: {', '.join(split.skipped_ood_sets)} "
              f"(evaluating on {', '.join(n for n, _, _ in split.ood_sets)})", file=sys.stderr)
    return split.to(device)


def result_dict(split: Split, cfg: RunConfig, result: Stage2Result, seconds: dict[str, float],
                budget: str | None = None, backbone: BackboneSpec | None = None) -> dict[str, Any]:
    """The metrics.json layout shared by `cmg.run`, `cmg.eval` and the sweep."""
    return {
        **({"backbone": {"path": backbone.file(split.partition), **backbone.identity()}}
           if backbone else {}),
        "setting": split.setting, "partition": split.partition, "mode": cfg.stage2.mode,
        "budget": budget, "config": cfg.to_dict(),
        "val": result.val, "test": result.test,
        "baselines": result.baselines,
        **({"ood_sets": {name: {"val_images": n_val, "test_images": n_test}
                         for name, n_val, n_test in split.ood_sets},
            "skipped_ood_sets": list(split.skipped_ood_sets)} if split.ood_sets else {}),
        "stage2": {"selected_epoch": result.selected_epoch, "margins": result.margins,
                   "history": result.history},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A `result_dict` as flat keys: `val_auroc`, `test_fpr95`, ..., `msp_test_auroc`,
    `energy_val_auroc`, ..., `head_maxlogit_test_auroc` (the stage-2 head's) (the names the sweep
    reports and the analysis reads). In Setting 2
    these are means over the OOD sets, and every set also has its own keys: `test_SVHN_auroc`,
    `msp_test_SVHN_auroc`, ..."""
    sources = {"": result, **{f"{b}_": result["baselines"][b]
                              for b in (*BASELINES, *HEAD_BASELINES)}}
    flat = {}
    for prefix, source in sources.items():
        for part in ("val", "test"):
            metrics = source[part]
            flat.update({f"{prefix}{part}_{name}": metrics[name] for name in METRIC_NAMES})
            for ood_set, values in metrics.get("ood_sets", {}).items():
                flat.update({f"{prefix}{part}_{ood_set}_{name}": v for name, v in values.items()})
    return flat


def run_partition(split: Split, cfg: RunConfig, device: str | torch.device = "cpu", *,
                  workdir: str | Path | None = None, budget: str | None = None,
                  quiet: bool = False, backbone: BackboneSpec | None = None,
                  compile_model: bool = False) -> dict[str, Any]:
    """Stage 1, stage 2 and the metrics of one partition's split (`load_partition`, on the
    device). With a `backbone`, it replaces the stage-1 classifier: stage 1 trains only the
    CVAE. `compile_model`: torch.compile the stage-1 training steps (cmg.precision)."""
    device = torch.device(device)
    frozen = (backbone.load(split.num_classes, split.family, cfg.classifier.head_width, device,
                            trained_for=(split.setting, split.partition, cfg.data))
              if backbone is not None else None)
    checkpoint = (lambda kind: Path(workdir) / f"{kind}.pt") if workdir is not None else (
        lambda kind: None)
    stage1 = train_stage1(split, cfg, device, frozen, checkpoint, quiet=quiet,
                          compile_model=compile_model)
    t = time.perf_counter()
    result = run_stage2(stage1.classifier, stage1.cvae, split, cfg.stage2, device,
                        cfg.classifier.amp, quiet)
    seconds = {**stage1.seconds, "stage2": time.perf_counter() - t}
    return result_dict(split, cfg, result, seconds, budget, backbone)
