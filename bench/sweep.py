"""Benchmark of the sweep's own cost: how much of the wall time is Ray and bookkeeping.

    python bench/sweep.py                       # smoke budget, 4 trials, one at a time
    python bench/sweep.py --budget quick --num-samples 2

Runs a real sweep (local Ray) with one trial at a time and no parallel stage-1 prewarm (stage 1
trains inside the first trial), so that wall time minus the time spent in
training and evaluation (stage-1 training, stage-2 fine-tuning and scoring, as the trials measure
it) is the overhead: Ray start-up, trial processes, data and artifact loading, checkpoints,
the searcher. The last line is one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.trials import trial_rows  # noqa: E402
from tune.sweep import main as sweep_main  # noqa: E402


def read_rows(folder: Path) -> list[dict]:
    return [row for trial in folder.glob("trial-*") for row in trial_rows(trial)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="smoke")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--setting", default="same_dataset_mnist")
    p.add_argument("--storage", default=None, help="default: a temporary folder")
    args = p.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="cmg-bench-")
    space = Path(storage) / "bench-space.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text("latent_dim: 32\n")  # one stage-1 key per partition: measure the sweep

    start = time.perf_counter()
    summary = sweep_main(["--setting", args.setting, "--budget", args.budget, "--num-samples",
                          str(args.num_samples), "--storage", storage, "--name", "bench",
                          "--space", str(space), "--max-concurrent", "1", "--scheduler", "none",
                          "--no-prewarm", "--quiet"])
    wall = time.perf_counter() - start

    experiment = Path(storage) / "bench"
    stage2_rows = read_rows(experiment)
    compute = sum(r["stage1_train_s"] + r["stage2_s"] for r in stage2_rows)
    partitions = len(stage2_rows)
    overhead = max(0.0, wall - compute)
    figures = {
        "trials_per_hour": round(summary["trials"]["total"] / wall * 3600, 2),
        "overhead_share": round(overhead / wall, 4),
        "overhead_s_per_partition": round(overhead / max(1, partitions), 3),
        "stage1_trained": summary["stage1_trained"],
        "stage1_reused": summary["stage1_reused"],
        "wall_s": round(wall, 1), "compute_s": round(compute, 1), "partitions": partitions,
        "budget": args.budget,
    }
    print(f"{summary['trials']['total']} trials, {partitions} partition evaluations in "
          f"{wall:.1f} s wall, {compute:.1f} s of training and evaluation")
    print(f"overhead: {100 * figures['overhead_share']:.1f}% of wall time, "
          f"{figures['overhead_s_per_partition']:.2f} s per partition evaluation")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
