"""stage1: is every stage-1 model trained once, first, with no GPU idle at the end of the prewarm?

    python bench/sim_cluster.py stage1 --out stage1.json
    python bench/sim_cluster.py stage1 --nodes 2 --gpus-per-node 2 --train-s 10 --trials 8

The real sweep driver (prewarm, search, leases, store) on a simulated cluster (bench/sim/harness.py)
whose space searches 3 latent sizes, so 5 classifiers and 15 CVAEs are reachable. Stage 1 is a
stand-in of TRAIN_S seconds per model under the store's real lease service, both in the prewarm's
tasks and in the trials (which find, wait for or train their models before each partition, as
the real trial does); stage 2 is PART_S seconds per partition. One GPU per task and per trial
(the sweep's default share).

Writes {"keys": N, "trainings": N, "classifier_trainings": C, "idle_slot_s": S, ...}: each key
trained exactly once (trainings == keys, none by a trial), one classifier per partition, and
`idle_slot_s`, the GPU-seconds with neither a stage-1 training nor a stage-2 partition on them,
from the moment every GPU first has a stage-1 model to train until the last stage-1 model is
published (the end of the prewarm, where a search that waited for the whole prewarm would leave
GPUs idle). Good: idle_slot_s well below one stand-in training (TRAIN_S). The window leaves out
the cluster's cold start (processes starting on a loopback cluster of 2 cores), the same for
any prewarm.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.sim.harness import SimCluster, Stage1StandIn, StandIn, trial_logs

LATENTS = (16, 32, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--train-s", type=float, default=12.0,
                        help="seconds each stand-in stage-1 model trains (default 12)")
    parser.add_argument("--part-s", type=float, default=3.0,
                        help="seconds each stand-in stage-2 partition takes (default 3)")
    parser.add_argument("--trials", type=int, default=8)


def run(args: argparse.Namespace) -> dict:
    from tune.artifacts import ArtifactStore
    from tune.driver import run_sweep
    from tune.sweep import build_spec

    gpus = args.nodes * args.gpus_per_node
    with tempfile.TemporaryDirectory(prefix="cmg-sim-") as work:
        work = Path(work)
        stage1 = Stage1StandIn(train_s=args.train_s, log_dir=work / "stage1-logs")
        stage1.log_dir.mkdir()
        standin = StandIn(part_s=args.part_s, log_dir=work / "logs", stage1=stage1)
        space = work / "space.yaml"
        space.write_text(f"latent_dim: {{choices: {list(LATENTS)}}}\n")
        with SimCluster(nodes=args.nodes, cpus_per_node=args.gpus_per_node,
                        gpus_per_node=args.gpus_per_node) as cluster:
            spec, _, _ = build_spec([
                "--setting", "synthetic_cifar10", "--budget", "smoke", "--quiet",
                "--scheduler", "none", "--address", cluster.address, "--storage",
                str(work / "storage"), "--name", "stage1", "--num-samples", str(args.trials),
                "--space", str(space)])
            summary = run_sweep(spec, trial_fn=standin.make, stage1_fn=stage1)
        store = ArtifactStore(spec.stage1_store)
        keys = store.keys()
        owners = {key: [t["owner"] for t in store.trainings(key)] for key in keys}
        trainings = [json.loads(p.read_text()) for p in stage1.log_dir.glob("*.json")]
        logs = trial_logs(standin.log_dir)
    busy = [(t["start"], t["end"]) for t in trainings] + [p for log in logs for p in log.parts]
    starts = sorted(t["start"] for t in trainings)
    window = (starts[min(gpus, len(starts)) - 1], max(t["end"] for t in trainings))
    classifiers = [k for k in keys if "-classifier-" in k]
    return {
        "gpus": gpus, "nodes": args.nodes, "train_s": args.train_s, "part_s": args.part_s,
        "latent_sizes": list(LATENTS), "trials": summary["trials"],
        "keys": len(keys), "trainings": sum(len(o) for o in owners.values()),
        "classifier_trainings": sum(len(owners[k]) for k in classifiers),
        "trained_by_trials": sum(not o.startswith("stage1/prewarm-")
                                 for os_ in owners.values() for o in os_),
        "idle_slot_s": round(idle_slot_seconds(busy, gpus, *window), 2),
        "window_s": round(window[1] - window[0], 2),
        "first_trial_after_s": round(min(log.start for log in logs) - starts[0], 2),
        "summary_stage1": summary["stage1_trained_by_kind"]}


def idle_slot_seconds(busy: list[tuple[float, float]], slots: int, start: float,
                      end: float) -> float:
    """Integral over [start, end] of (slots - intervals covering t), never below 0."""
    events = sorted([(max(a, start), 1) for a, b in busy if b > start and a < end]
                    + [(min(b, end), -1) for a, b in busy if b > start and a < end])
    idle, covered, last = 0.0, 0, start
    for t, step in events:
        idle += max(0, slots - covered) * (t - last)
        covered, last = covered + step, t
    return idle + max(0, slots - covered) * (end - last)


def verdict(result: dict) -> str:
    once = result["trainings"] == result["keys"] and result["trained_by_trials"] == 0
    ok = once and result["classifier_trainings"] == 5 and result["idle_slot_s"] < 0.5 * result[
        "train_s"]
    return (f"{'PASS' if ok else 'FAIL'}: {result['keys']} stage-1 keys, {result['trainings']} "
            f"trainings ({result['classifier_trainings']} classifiers, "
            f"{result['trained_by_trials']} by trials); {result['idle_slot_s']} idle GPU-seconds "
            f"at the end of the prewarm (one stand-in training: {result['train_s']} s)")
