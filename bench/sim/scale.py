"""scale: does the driver keep every slot busy as nodes and trials grow?

    python bench/sim_cluster.py scale --nodes 8 --trials 200 --part-s 2 --out scale.json
    python bench/sim_cluster.py scale --nodes 8 --trials 3000 --part-s 1 --sample-every 250

The real sweep driver on a simulated cluster (bench/sim/harness.py: N nodes of 2 logical CPUs
and 1 GPU, two trials per node at 0.5 GPU, `--max-concurrent` = slots), trials of five partitions
that each take PART_S seconds. Measures:

- efficiency: partitions finished per hour between ramp-up (every slot has started a trial) and
  tail (the last trial has started), over the ideal `slots x 3600 / PART_S`;
- report_block_p50_s / _p95_s: how long a trial blocks in `tune.report` (the GPU idles meanwhile);
- slot_gap_p50_s / _p95_s: from a trial's end to the next trial's start in the same process;
- driver_cpu_s_per_trial, snapshot_bytes (Tune's experiment state and searcher pickle at the end);
- with --sample-every K: report_block_p95_s of each K trials in start order, and the growth from
  the first sample to the last (flat is good: risk #1 of docs/cluster.md predicts linear).

Good: efficiency >= 0.9, report_block_p95_s < 0.1, slot_gap_p50_s < 0.5, growth < 2.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.sim.harness import (SimCluster, StandIn, TrialLog, percentile, run_sim_sweep,
                               snapshot_bytes, trial_logs)
from cmg.errors import fail

GPUS_PER_TRIAL = 0.5  # two trials per simulated GPU node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=8, help="simulated GPU nodes (default 8)")
    parser.add_argument("--trials", type=int, default=200, help="configurations (default 200)")
    parser.add_argument("--part-s", type=float, default=2.0,
                        help="seconds of stand-in training per partition (default 2)")
    parser.add_argument("--sample-every", type=int, default=0, metavar="K",
                        help="also report_block_p95_s of every K trials, in start order")
    parser.add_argument("--full-report", action="store_true",
                        help="trials report every key to Tune, as before cmg.results.TUNE_KEYS")
    parser.add_argument("--heads-in-checkpoint", action="store_true",
                        help="every finished partition's head in each checkpoint, as before "
                             "heads got their own files in the trial folder")


def run(args: argparse.Namespace) -> dict:
    if min(args.nodes, args.trials) < 1 or args.part_s <= 0 or args.sample_every < 0:
        fail("scale: --nodes and --trials must be at least 1, --part-s above 0, "
             "--sample-every 0 or more")
    with tempfile.TemporaryDirectory(prefix="cmg-sim-") as work:
        standin = StandIn(part_s=args.part_s, log_dir=Path(work) / "logs",
                          full_report=args.full_report,
                          heads_in_checkpoint=args.heads_in_checkpoint)
        with SimCluster(nodes=args.nodes) as cluster:
            slots = cluster.slots(cpus_per_trial=1, gpus_per_trial=GPUS_PER_TRIAL)
            sweep = run_sim_sweep(cluster, standin, Path(work) / "storage", args.trials,
                                  GPUS_PER_TRIAL, max_concurrent=slots)
        logs = trial_logs(standin.log_dir)
        result = {"nodes": args.nodes, "slots": slots, "trials": args.trials,
                  "part_s": args.part_s, "full_report": args.full_report,
                  "heads_in_checkpoint": args.heads_in_checkpoint,
                  "trial_runs": len(logs),
                  "trials_complete": sweep.summary["trials"]["complete"],
                  "wall_s": round(sweep.wall_s, 1), "host_cpu_busy": round(sweep.host_busy, 3),
                  "driver_cpu_s_per_trial": round(sweep.driver_cpu_s / args.trials, 4),
                  "snapshot_bytes": snapshot_bytes(sweep.experiment),
                  **steady_state(logs, slots, args.part_s), **stalls(logs)}
    if args.sample_every:
        result.update(block_growth(logs, args.sample_every))
    return result


def steady_state(logs: list[TrialLog], slots: int, part_s: float) -> dict:
    """Efficiency between ramp-up (the slots-th trial start) and tail (the last trial start)."""
    starts = sorted(t.start for t in logs)
    if len(starts) <= slots:
        return {"efficiency": None, "ramp_up_s": None, "steady_s": 0.0}
    ramp, tail = starts[slots - 1], starts[-1]
    finished = sum(ramp <= returned <= tail for t in logs for _, returned in t.reports)
    ideal = slots * (tail - ramp) / part_s
    return {"efficiency": round(finished / ideal, 3) if ideal else None,
            "ramp_up_s": round(ramp - starts[0], 2), "steady_s": round(tail - ramp, 1)}


def stalls(logs: list[TrialLog]) -> dict:
    """Report block times and slot gaps (same process: one trial's end to the next's start)."""
    blocks = [returned - called for t in logs for called, returned in t.reports]
    gaps = []
    by_process: dict[int, list[TrialLog]] = {}
    for t in logs:
        by_process.setdefault(t.pid, []).append(t)
    for runs in by_process.values():
        gaps += [b.start - a.end for a, b in zip(runs, runs[1:])]
    return {"report_block_p50_s": _round(percentile(blocks, 50)),
            "report_block_p95_s": _round(percentile(blocks, 95)),
            "slot_gap_p50_s": _round(percentile(gaps, 50)),
            "slot_gap_p95_s": _round(percentile(gaps, 95)),
            "processes": len(by_process)}


def block_growth(logs: list[TrialLog], every: int) -> dict:
    """report_block_p95_s of each `every` trial runs in start order, and last / first."""
    samples = []
    for first in range(0, len(logs), every):
        chunk = logs[first:first + every]
        blocks = [returned - called for t in chunk for called, returned in t.reports]
        samples.append({"trials_from": first, "trials": len(chunk),
                        "report_block_p95_s": _round(percentile(blocks, 95))})
    head, last = samples[0]["report_block_p95_s"], samples[-1]["report_block_p95_s"]
    return {"block_samples": samples,
            "block_growth": round(last / head, 2) if head and last is not None else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def verdict(result: dict) -> str:
    checks = [("efficiency", result["efficiency"], ">=", 0.9),
              ("report_block_p95_s", result["report_block_p95_s"], "<", 0.1),
              ("slot_gap_p50_s", result["slot_gap_p50_s"], "<", 0.5)]
    if "block_growth" in result:
        checks.append(("block_growth", result["block_growth"], "<", 2.0))
    passed = all(v is not None and (v >= limit if op == ">=" else v < limit)
                 for _, v, op, limit in checks)
    figures = ", ".join(f"{name} {value} {op} {limit}" for name, value, op, limit in checks)
    return (f"scale {'PASS' if passed else 'FAIL'}: {figures} ({result['nodes']} nodes, "
            f"{result['slots']} slots, {result['trials']} trials of 5 x {result['part_s']} s; "
            f"host CPU {result['host_cpu_busy']:.0%} busy)")
