"""CUDA correctness check of `cmg/`: the pipeline of both model families on a GPU.

    python bench/cuda_check.py                      # needs CUDA; MNIST from the usual data root

Runs MNIST (real data, `quick` budget, both modes) and the CIFAR models (`synthetic_cifar10`,
`smoke` budget plus a few epochs) with bf16 autocast and channels-last, and checks that every
metric is finite and the IND accuracies beat chance, and, on real data (MNIST), that the AUROCs
beat chance too (the synthetic images' OOD classes are not meant to be detectable).
Prints the seconds of each stage; the last line is one JSON object.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cmg.config import budget_config  # noqa: E402
from cmg.pipeline import run_partition  # noqa: E402

REAL = {"same_dataset_mnist"}
CASES = [
    ("same_dataset_mnist", "quick", "mnist", "CMG-energy", []),
    ("same_dataset_mnist", "quick", "mnist", "CMG-softmax", []),
    ("synthetic_cifar10", "smoke", "cifar", "CMG-energy",
     ["classifier.epochs=4", "cvae.epochs=4", "stage2.epochs=3", "data.eval_limit=60"]),
    ("synthetic_cifar10", "smoke", "cifar", "CMG-softmax",
     ["classifier.epochs=4", "cvae.epochs=4", "stage2.epochs=3", "data.eval_limit=60"]),
]


def check(m: dict, real: bool) -> list[str]:
    problems = []
    for part in ("val", "test"):
        for name, value in m[part].items():
            if not math.isfinite(value):
                problems.append(f"{part} {name} is {value}")
        if real and m[part]["auroc"] <= 0.5:
            problems.append(f"{part} AUROC {m[part]['auroc']:.4f} is not above chance")
        if m[part]["ind_acc"] <= 1 / 6 + 0.05:
            problems.append(f"{part} IND accuracy {m[part]['ind_acc']:.4f} is near chance")
    return problems


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for setting, budget, family, mode, extra in CASES:
            cfg = budget_config(budget, family, [f"stage2.mode={mode}", *extra])
            work = Path(tmp) / setting  # modes share stage 1; the second run resumes/reuses it
            start = time.perf_counter()
            m = run_partition(setting, 1, cfg, device, workdir=work, budget=budget, quiet=True)
            wall = time.perf_counter() - start
            problems = check(m, setting in REAL)
            failures += [f"{setting} {mode}: {p}" for p in problems]
            rows.append({"setting": setting, "mode": mode, "budget": budget,
                         "test_auroc": round(m["test"]["auroc"], 4),
                         "msp_test_auroc": round(m["baselines"]["msp"]["test"]["auroc"], 4),
                         "energy_test_auroc": round(m["baselines"]["energy"]["test"]["auroc"], 4),
                         "ind_acc": round(m["test"]["ind_acc"], 4),
                         "seconds": m["seconds"], "wall_s": round(wall, 2),
                         "ok": not problems})
            print(json.dumps(rows[-1]), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**20
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA checks passed")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "ok": not failures,
                      "peak_mem_mb": round(peak, 1), "runs": rows}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
