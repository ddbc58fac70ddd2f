"""GPU packing: total throughput of 1, 2, 4, 8 concurrent stage-1 or stage-2 runs on one device.

    python bench/packing.py --device cuda --setting same_dataset_mnist --stage 1
    python bench/packing.py --device cuda --setting synthetic_cifar10_50k --stage 2 --procs 1 2 4
    python bench/packing.py --procs 1 2 --size 256          # a CPU dry run of the script

Each of N separate processes (no Ray: this is what N trials packed on one GPU do) trains the
engine's stage 1 (classifier) or runs the engine's stage 2 on cached features, on the same data;
they start together behind a barrier. Total images per second = sum of all processes' images /
wall time of the slowest. The speed-up over one process says what fraction of a GPU a trial
should ask for (`tune.sweep --gpus-per-trial`). The last line is one JSON object:
{"device", "setting", "stage", "ips": {"1": ..., "2": ...}, "speedup": {...}}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(args: argparse.Namespace, barrier, results) -> None:
    import torch

    import common  # noqa: F401  (registers synthetic_cifar10_50k in this process)
    from cmg.cli import resolve_device
    from cmg.config import budget_config
    from cmg.pipeline import load_partition
    from cmg.stage1 import train_classifier, train_cvae
    from cmg.stage2 import freeze_features, run_stage2

    device = resolve_device(args.device)
    torch.set_num_threads(1)  # N processes share the host's cores
    family = "cifar" if "cifar" in args.setting else "mnist"
    cfg = budget_config("smoke", family, [f"data.train_limit={args.size}", "data.eval_limit=500",
                                          f"classifier.epochs={args.epochs}",
                                          f"stage2.epochs={args.epochs}", "cvae.epochs=1"])
    split = load_partition(args.setting, 1, cfg, device, args.data_root)
    if args.stage == 2:  # the frozen models and features exist before the timed work
        classifier, _ = train_classifier(split, cfg.classifier, device, quiet=True)
        cvae, _ = train_cvae(split, cfg.cvae, device, quiet=True)
        features = freeze_features(classifier, split, cfg.classifier.amp)
    barrier.wait()
    start = time.perf_counter()
    if args.stage == 1:
        train_classifier(split, cfg.classifier, device, quiet=True)
    else:
        run_stage2(classifier, cvae, split, cfg.stage2, device, cfg.classifier.amp, quiet=True,
                   features=features)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results.put((len(split.train_x) * args.epochs, start, time.perf_counter()))


def run(args: argparse.Namespace, procs: int) -> float:
    ctx = mp.get_context("spawn")  # CUDA needs fresh processes
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(args, barrier, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    done = [results.get() for _ in workers]
    for w in workers:
        w.join()
    wall = max(end for _, _, end in done) - min(start for _, start, _ in done)
    return sum(images for images, _, _ in done) / wall


def main() -> None:
    from cmg.cli import add_data_root_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--setting", default="same_dataset_mnist")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--size", type=int, default=6000, help="IND training images per process")
    p.add_argument("--epochs", type=int, default=2)
    add_data_root_arg(p)
    args = p.parse_args()
    ips = {}
    for n in args.procs:
        ips[n] = run(args, n)
        print(f"{n} process(es): {ips[n]:10.1f} images/s in total "
              f"({ips[n] / ips[args.procs[0]]:.2f}x of {args.procs[0]})", flush=True)
    name = args.device
    if args.device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
    print(json.dumps({"device": name, "setting": args.setting, "stage": args.stage,
                      "ips": {str(n): round(v, 1) for n, v in ips.items()},
                      "speedup": {str(n): round(v / ips[args.procs[0]], 2)
                                  for n, v in ips.items()}}))


if __name__ == "__main__":
    main()
