"""CUDA correctness check of `cmg/`: the pipeline of both settings and both model families.

    python bench/cuda_check.py                      # needs CUDA; MNIST from the usual data root
    python bench/cuda_check.py --device cpu         # the same checks on the CPU (a dry run)

Setting 1 runs MNIST (real data, `quick` budget, both modes) and the CIFAR models
(`synthetic_cifar10`, `smoke` budget plus a few epochs). Setting 2 (`different_dataset`) runs on
a generated data root (synthetic CIFAR-10 batches, synthetic CIFAR-100, PNG/JPEG folder sets):
once with its own stage 1, once with the classifier of that run as a frozen `--backbone` (stage
1 then trains only the CVAE). All with bf16 autocast and channels-last on CUDA. Checked: every
metric (per OOD set too) is finite, the IND accuracies beat chance, and, on real data (MNIST),
the AUROCs beat chance (the synthetic images' OOD sets are not meant to be detectable).
Prints the seconds of each stage; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cmg.backbone import BackboneSpec  # noqa: E402
from cmg.config import budget_config  # noqa: E402
from cmg.data import get_setting  # noqa: E402
from cmg.data.synthetic import write_cifar_data_root  # noqa: E402
from cmg.pipeline import flat_metrics, load_partition, run_partition  # noqa: E402

REAL = {"same_dataset_mnist"}
CIFAR_SMOKE = ["classifier.epochs=4", "cvae.epochs=4", "stage2.epochs=3", "data.eval_limit=60"]
# (setting, budget, family, mode, overrides, backbone): "own" = the classifier that the previous
# run of the setting trained, as a frozen backbone in the "cmg" format
CASES = [
    ("same_dataset_mnist", "quick", "mnist", "CMG-energy", [], None),
    ("same_dataset_mnist", "quick", "mnist", "CMG-softmax", [], None),
    ("synthetic_cifar10", "smoke", "cifar", "CMG-energy", CIFAR_SMOKE, None),
    ("synthetic_cifar10", "smoke", "cifar", "CMG-softmax", CIFAR_SMOKE, None),
    ("different_dataset", "smoke", "cifar", "CMG-energy", CIFAR_SMOKE, None),
    ("different_dataset", "smoke", "cifar", "CMG-softmax", CIFAR_SMOKE, "own"),
]


def check(m: dict, real: bool, num_classes: int) -> list[str]:
    problems = [f"{name} is {value}" for name, value in flat_metrics(m).items()
                if not math.isfinite(value)]
    for part in ("val", "test"):
        if real and m[part]["auroc"] <= 0.5:
            problems.append(f"{part} AUROC {m[part]['auroc']:.4f} is not above chance")
        if m[part]["ind_acc"] <= 1 / num_classes + 0.05:
            problems.append(f"{part} IND accuracy {m[part]['ind_acc']:.4f} is near chance")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    device = torch.device(p.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = write_cifar_data_root(Path(tmp) / "data")
        for setting, budget, family, mode, extra, backbone in CASES:
            cfg = budget_config(budget, family, [f"stage2.mode={mode}", *extra])
            work = Path(tmp) / setting  # modes share stage 1; the second run resumes/reuses it
            spec = (BackboneSpec.from_args(work / "classifier.pt", "cmg") if backbone else None)
            if spec is not None:
                work = work / "with-backbone"
            start = time.perf_counter()
            split = load_partition(setting, 1, cfg, device, data_root)
            m = run_partition(split, cfg, device, workdir=work, budget=budget, quiet=True,
                              backbone=spec)
            wall = time.perf_counter() - start
            problems = check(m, setting in REAL, len(get_setting(setting).ind_classes(1)))
            if spec is not None and "classifier" in m["seconds"]:
                problems.append("a run with a backbone trained a classifier")
            failures += [f"{setting} {mode}: {p}" for p in problems]
            rows.append({"setting": setting, "mode": mode, "budget": budget,
                         "backbone": backbone or "",
                         "test_auroc": round(m["test"]["auroc"], 4),
                         "msp_test_auroc": round(m["baselines"]["msp"]["test"]["auroc"], 4),
                         "energy_test_auroc": round(m["baselines"]["energy"]["test"]["auroc"], 4),
                         "ind_acc": round(m["test"]["ind_acc"], 4),
                         "seconds": m["seconds"], "wall_s": round(wall, 2),
                         "ok": not problems})
            print(json.dumps(rows[-1]), flush=True)
    peak = (round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda"
            else None)
    print("FAILED: " + "; ".join(failures) if failures else f"all checks passed on {name}")
    print(json.dumps({"device": name, "ok": not failures, "peak_mem_mb": peak,
                      "runs": rows}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
