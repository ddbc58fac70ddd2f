"""placement: with as many trials as GPUs, does every GPU get work?

    python bench/sim_cluster.py placement --out placement.json                 # the default share
    python bench/sim_cluster.py placement --gpus-per-trial 0.25 --out before.json
    python bench/sim_cluster.py placement --trials-per-gpu 2 --nodes 4 --gpus-per-node 4

The real sweep driver on a simulated cluster (bench/sim/harness.py: 8 nodes of 8 logical CPUs and
8 logical GPUs by default), as many trials at once as GPUs, each a stand-in that holds its
resources for 5 x PART_S seconds and records the GPU ids Ray gave it (`ray.get_gpu_ids()`).
Without --gpus-per-trial the sweep resolves its own default share and trials at once
(tune/placement.py), exactly as `python -m tune.sweep --address ...` does. --trials-per-gpu k asks
for k x GPUs trials at once (`--max-concurrent`), from which the sweep's default is a 1/k share:
the fractional run.

Writes {"gpus", "busy_fraction", "full_s", "busy_fraction_enough", "enough_s", "gpus_busy",
"gpus_per_trial", "peak_running", "trials_per_busy_gpu", "nodes_used", ...}. `busy_fraction` is
GPU-seconds with at least one trial over GPU-seconds, over the whole time (`full_s`) that every
trial the sweep runs at once was running (k x GPUs of them): then every GPU must have work, at
every moment of it, not only at the peak. It fails when the share is deeper than the trials at
once need (0.25 GPU per trial: 64 trials fill 16 of 64 GPUs, four deep: Ray gives a fractional
request the best-fit GPU of its node) and when the sweep never ran all its trials at once
(`full_s` 0: a busy fraction of 0). `busy_fraction_enough` counts the longer time (`enough_s`)
that at least as many trials ran as GPUs, ramp and tail included, where best-fit packing can
leave a GPU idle beside a GPU of two trials. `gpus_busy` and `trials_per_busy_gpu` are the (node,
GPU id) pairs held at the peak. Good: busy_fraction 1.0.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from bench.sim.harness import SimCluster, StandIn, TrialLog, trial_logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="the share to measure (default: the sweep's own default)")
    parser.add_argument("--trials-per-gpu", type=int, default=1,
                        help="trials at once per GPU, and as many trials in all (--max-concurrent "
                             "k x GPUs; default 1: the documented command, no --max-concurrent)")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="logical GPUs (and as many CPUs per trial at once) per node")
    parser.add_argument("--part-s", type=float, default=20.0,
                        help="seconds each stand-in partition holds its GPU (default 20: long "
                             "enough that all 64 trials run at once on 2 cores)")


def run(args: argparse.Namespace) -> dict:
    from tune.driver import run_sweep
    from tune.sweep import build_spec

    gpus = args.nodes * args.gpus_per_node
    trials = gpus * args.trials_per_gpu
    share = [] if args.gpus_per_trial is None else ["--gpus-per-trial", str(args.gpus_per_trial)]
    at_once = [] if args.trials_per_gpu == 1 else ["--max-concurrent", str(trials)]
    with tempfile.TemporaryDirectory(prefix="cmg-sim-") as work:
        standin = StandIn(part_s=args.part_s, log_dir=Path(work) / "logs")
        with SimCluster(nodes=args.nodes, cpus_per_node=trials // args.nodes,
                        gpus_per_node=args.gpus_per_node) as cluster:
            # the documented cluster command: --max-concurrent and the share only if asked
            spec, _, _ = build_spec([
                "--setting", "synthetic_cifar10", "--budget", "smoke", "--no-prewarm",
                "--scheduler", "none", "--address", cluster.address, "--storage",
                str(Path(work) / "storage"), "--name", "placement", "--num-samples",
                str(trials), *share, *at_once])
            summary = run_sweep(spec, trial_fn=standin.make)
        logs = trial_logs(standin.log_dir)
    return {"gpus": gpus, "nodes": args.nodes, "trials": len(logs),
            "gpus_per_trial": summary["resources"]["gpu"],  # the share the sweep chose
            "default_share": args.gpus_per_trial is None,
            "trials_per_gpu": args.trials_per_gpu, "part_s": args.part_s,
            "trials_complete": summary["trials"]["complete"], **occupancy(logs, gpus, trials)}


def occupancy(logs: list[TrialLog], gpus: int, at_once: int) -> dict:
    """How much of the GPUs' time had work while all AT_ONCE trials ran, and while at least as
    many as GPUs ran; how deep each GPU was shared at the peak."""
    full_s, full = _busy(logs, gpus, at_once)
    enough_s, enough = _busy(logs, gpus, gpus)
    events = sorted([(t.start, 1) for t in logs] + [(t.end, -1) for t in logs])
    running, peak, peak_at = 0, 0, 0.0
    for at, step in events:
        running += step
        if running > peak:
            peak, peak_at = running, at
    held = _held(t for t in logs if t.start <= peak_at < t.end)
    return {"busy_fraction": full, "full_s": full_s, "busy_fraction_enough": enough,
            "enough_s": enough_s, "peak_running": peak, "gpus_busy": len(held),
            "trials_per_busy_gpu": dict(sorted(Counter(held.values()).items())),
            "nodes_used": len({node for node, _ in held}),
            "gpu_ids_seen": sorted({str(g) for t in logs for g in t.gpu_ids}, key=float)}


def _busy(logs: list[TrialLog], gpus: int, least: int) -> tuple[float, float]:
    """(seconds with at least LEAST trials running, the fraction of the GPUs' time in them that
    had a trial); (0, 0) if never that many."""
    events = sorted([(t.start, 1, i) for i, t in enumerate(logs)]
                    + [(t.end, -1, i) for i, t in enumerate(logs)])
    running: set[int] = set()
    covered, busy, last = 0.0, 0.0, 0.0
    for at, step, i in events:  # at equal times, ends (-1) before starts
        if len(running) >= least:  # the span since the last event
            covered += at - last
            busy += (at - last) * len(_held(logs[j] for j in running)) / gpus
        (running.add if step > 0 else running.discard)(i)
        last = at
    return round(covered, 2), round(busy / covered, 4) if covered else 0.0


def _held(trials) -> Counter:
    """Trials on each (node, GPU id) pair."""
    return Counter((t.node, str(gpu)) for t in trials for gpu in t.gpu_ids)


def verdict(result: dict) -> str:
    share = f"{result['gpus_per_trial']:g} GPU per trial" + (
        " (the default)" if result["default_share"] else "")
    passed = result["busy_fraction"] == 1.0
    return (f"placement {'PASS' if passed else 'FAIL'}: busy_fraction "
            f"{result['busy_fraction']:.4f} over {result['full_s']:.1f} s with all "
            f"{result['trials']} trials at once ({result['busy_fraction_enough']:.4f} over "
            f"{result['enough_s']:.1f} s with at least {result['gpus']}); {result['gpus_busy']} "
            f"of {result['gpus']} GPUs busy at the peak of {result['peak_running']} trials on "
            f"{result['nodes_used']} nodes, {share}; "
            + ("every GPU has work" if passed else "GPUs idle while trials share others"))
