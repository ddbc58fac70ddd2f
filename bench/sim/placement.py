"""placement: with as many trials as GPUs, does every GPU get work?

    python bench/sim_cluster.py placement --out placement.json                 # the default share
    python bench/sim_cluster.py placement --gpus-per-trial 0.25 --out before.json

The real sweep driver on a simulated cluster (bench/sim/harness.py: 8 nodes of 8 logical CPUs and
8 logical GPUs), 64 trials at once (as many as GPUs), each a stand-in that holds its resources for
5 x PART_S seconds and records the GPU ids Ray gave it (`ray.get_gpu_ids()`). Without
--gpus-per-trial the sweep resolves its own default share and trials at once (tune/placement.py),
exactly as `python -m tune.sweep --address ...` does.

Writes {"gpus": 64, "gpus_busy": N, "busy_fraction": F, "gpus_per_trial", "peak_running",
"trials_per_busy_gpu", "nodes_used", ...}: gpus_busy counts the (node, GPU id) pairs that some trial
held while `peak_running` trials ran at once. Good: F = 1.0 with peak_running >= gpus. Ray gives a
fractional request the best-fit GPU of its node, so a share of 0.25 is expected to fill a quarter
of the GPUs four trials deep.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from bench.sim.harness import SimCluster, StandIn, TrialLog, trial_logs

NODES, GPUS_PER_NODE = 8, 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="the share to measure (default: the sweep's own default)")
    parser.add_argument("--part-s", type=float, default=20.0,
                        help="seconds each stand-in partition holds its GPU (default 20: long "
                             "enough that all 64 trials run at once on 2 cores)")


def run(args: argparse.Namespace) -> dict:
    from tune.driver import run_sweep
    from tune.sweep import build_spec

    gpus = NODES * GPUS_PER_NODE
    share = [] if args.gpus_per_trial is None else ["--gpus-per-trial", str(args.gpus_per_trial)]
    with tempfile.TemporaryDirectory(prefix="cmg-sim-") as work:
        standin = StandIn(part_s=args.part_s, log_dir=Path(work) / "logs")
        with SimCluster(nodes=NODES, cpus_per_node=GPUS_PER_NODE,
                        gpus_per_node=GPUS_PER_NODE) as cluster:
            # the documented cluster command: no --max-concurrent, the share only if asked
            spec, _, _ = build_spec([
                "--setting", "synthetic_cifar10", "--budget", "smoke", "--no-prewarm",
                "--scheduler", "none", "--address", cluster.address, "--storage",
                str(Path(work) / "storage"), "--name", "placement", "--num-samples", str(gpus),
                *share])
            summary = run_sweep(spec, trial_fn=standin.make)
        logs = trial_logs(standin.log_dir)
    return {"gpus": gpus, "nodes": NODES, "trials": len(logs),
            "gpus_per_trial": summary["resources"]["gpu"],  # the share the sweep chose "default_share": args.gpus_per_trial is None,
            "part_s": args.part_s,
            "trials_complete": summary["trials"]["complete"], **occupancy(logs)}


def occupancy(logs: list[TrialLog]) -> dict:
    """GPUs held while the most trials ran at once, and how deep each was shared."""
    events = sorted([(t.start, 1) for t in logs] + [(t.end, -1) for t in logs])
    running, peak, peak_at = 0, 0, 0.0
    for at, step in events:
        running += step
        if running > peak:
            peak, peak_at = running, at
    at_peak = [t for t in logs if t.start <= peak_at < t.end]
    held = Counter((t.node, str(gpu)) for t in at_peak for gpu in t.gpu_ids)
    busy = len(held)
    return {"peak_running": peak, "gpus_busy": busy,
            "busy_fraction": round(busy / (NODES * GPUS_PER_NODE), 4),
            "trials_per_busy_gpu": dict(sorted(Counter(held.values()).items())),
            "nodes_used": len({t.node for t in at_peak}),
            "gpu_ids_seen": sorted({str(g) for t in logs for g in t.gpu_ids}, key=float)}


def verdict(result: dict) -> str:
    share = f"{result['gpus_per_trial']:g} GPU per trial" + (
        " (the default)" if result["default_share"] else "")
    passed = result["busy_fraction"] == 1.0 and result["peak_running"] >= result["gpus"]
    return (f"placement {'PASS' if passed else 'FAIL'}: {result['gpus_busy']} of {result['gpus']} "
            f"GPUs busy (busy_fraction {result['busy_fraction']:.2f}) with {share}, "
            f"{result['peak_running']} trials at once on {result['nodes_used']} nodes; "
            + ("every GPU has work" if passed else "GPUs idle while trials share others"))
