"""tpe: the searcher's ask and tell cost alone (no Ray cluster), as the study grows.

    python bench/sim_cluster.py tpe --trials 1000 --running 64 --out tpe.json
    python bench/sim_cluster.py tpe --trials 1000,5000 --running 64

The sweep's own searcher (`tune.search.sweep_searcher`: the define-by-run space of the default
sweep, the reference first point, the project's TPE sampler and orphan adoption) on the study
storage a sweep uses (the journal file in the experiment folder), driven as Ray Tune drives it:
RUNNING trials kept at `--running`, each finished trial told five partition results and its
completion, a new one asked in its place. The objective is a fixed function of the parameters.

For each size N of `--trials`: p50/p95 of `suggest` (ask + the space + the orphan scan), of
`on_trial_result` and of `on_trial_complete` (tell), over the last tenth of the trials before N.
The top-level `ask_p95_s` is at the largest N. Good: ask p95 < 0.1 s at 1,000 trials, < 0.5 s at
5,000.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from pathlib import Path

from bench.sim.harness import percentile
from cmg.errors import fail
from cmg.results import OBJECTIVE

PARTITIONS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", default="1000",
                        help="study sizes to measure at, comma-separated (default 1000)")
    parser.add_argument("--running", type=int, default=64,
                        help="trials RUNNING at once (default 64)")
    parser.add_argument("--mode", default="CMG-energy",
                        help="the sweep's --mode: CMG-energy (default), CMG-softmax or both")
    parser.add_argument("--sampler", choices=("sweep", "unwindowed", "optuna-default"),
                        default="sweep",
                        help="the sweep's TPE (default); the same without its window of "
                             "trials (tune.search.TPE_WINDOW), as before it had one; or the "
                             "plain TPESampler(seed) that Ray's OptunaSearch builds")


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        fail(f"tpe: --trials takes positive counts like 1000,5000 (got {text!r})")
    return sizes


def run(args: argparse.Namespace) -> dict:
    sizes = _sizes(args.trials)
    if args.running < 1:
        fail("tpe: --running must be at least 1")
    from tune.search import sweep_searcher
    from tune.sweep import build_spec

    with tempfile.TemporaryDirectory(prefix="cmg-tpe-") as work:
        spec, _, _ = build_spec(["--setting", "synthetic_cifar10", "--budget", "smoke",
                                 "--mode", args.mode, "--storage", work, "--name", "tpe",
                                 "--num-samples", str(sizes[-1]), "--quiet"])
        Path(spec.experiment).mkdir(parents=True)
        searcher = sweep_searcher(spec)
        if args.sampler == "unwindowed":
            searcher._ot_study.sampler.window = sizes[-1]
        elif args.sampler == "optuna-default":
            import optuna

            searcher._ot_study.sampler = optuna.samplers.TPESampler(seed=spec.options.seed)
        timings = _drive(searcher, sizes[-1], args.running)
        journal_bytes = (Path(spec.experiment) / "optuna.journal").stat().st_size
    by_size = [{"trials": n, **_stats(timings, n)} for n in sizes]
    return {"running": args.running, "mode": args.mode, "sampler": args.sampler,
            "journal_bytes": journal_bytes,
            "by_trials": by_size, **{k: v for k, v in by_size[-1].items() if k != "trials"}}


def _drive(searcher, total: int, running: int) -> dict[str, list[tuple[int, float]]]:
    """Ask, report and tell `total` trials with `running` in flight; per call (trial number,
    seconds)."""
    timings: dict[str, list[tuple[int, float]]] = {"ask": [], "result": [], "tell": []}
    in_flight: collections.deque[tuple[int, dict]] = collections.deque()
    asked = 0

    def timed(kind: str, number: int, call, *args):
        started = time.perf_counter()
        out = call(*args)
        timings[kind].append((number, time.perf_counter() - started))
        return out

    while asked < total or in_flight:
        while asked < total and len(in_flight) < running:
            in_flight.append((asked, timed("ask", asked, searcher.suggest, f"t{asked}")))
            asked += 1
        number, params = in_flight.popleft()
        quality = random.Random(json.dumps(params, sort_keys=True, default=str)).random()
        for step in range(1, PARTITIONS + 1):
            timed("result", number, searcher.on_trial_result, f"t{number}",
                  {OBJECTIVE: quality, "training_iteration": step})
        timed("tell", number, searcher.on_trial_complete, f"t{number}",
              {OBJECTIVE: quality, "partitions_done": PARTITIONS,
               "partitions_total": PARTITIONS, "training_iteration": PARTITIONS})
    return timings


def _stats(timings: dict[str, list[tuple[int, float]]], size: int) -> dict:
    """p50/p95 of each call over the trials numbered in the last tenth before `size`."""
    low = size - max(1, size // 10)
    out = {}
    for kind, calls in timings.items():
        seconds = [s for number, s in calls if low <= number < size]
        out[f"{kind}_p50_s"] = round(percentile(seconds, 50), 4)
        out[f"{kind}_p95_s"] = round(percentile(seconds, 95), 4)
    return out


def limit(trials: int) -> float:
    """The ask p95 that is good enough at a study of this size."""
    return 0.1 if trials <= 1000 else 0.5


def verdict(result: dict) -> str:
    figures = [(r["trials"], r["ask_p95_s"], limit(r["trials"])) for r in result["by_trials"]]
    passed = all(value < bound for _, value, bound in figures)
    text = ", ".join(f"ask p95 {value} s < {bound} at {n} trials" for n, value, bound in figures)
    return f"tpe {'PASS' if passed else 'FAIL'}: {text} ({result['running']} running)"
