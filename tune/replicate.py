"""`python -m tune.replicate EXPERIMENT`: re-run a finished sweep's best configurations with new
seeds, beside their control arms, so that their numbers carry seed variance as well as partition
variance and say what class mixing adds.

    python -m tune.replicate experiments/same_dataset_mnist-CMG-energy-demo --top 1
    python -m tune.replicate EXPERIMENT --top 3 --seeds 5 --with-defaults --arms none,single

The top configurations are ranked on validation (mean `val_auroc` over the partitions, complete
configurations only); `--with-defaults` adds the sweep's first configuration (the reference's
defaults, even if early stopping cut it short), so that tuned CMG is compared with default CMG
on the same seeds. Each runs on every partition once per new seed (seeds S+1 .. S+SEEDS, where S
is the sweep's `--seed`) and per arm (cmg.results.ARMS: CMG, and by default every control: the
same configuration training the head against single-class pseudo-OOD, noise, or nothing).
Every (seed, partition) cell is seeded on its own (cmg.config.cell_config): stage 1, stage 2 and
the train/validation split, so cells are independent draws; the cell's stage-1 models are
trained once and shared by every configuration and arm of that cell. Replicates are scored on
the whole validation and test sets (`--eval-limit N` caps them). The sweep's own run (seed
S) is not counted: it is the run the configuration was selected on.
The trials are Ray Tune trials in EXPERIMENT/replicate/run-<time>/ (one Tune run per call),
with the sweep's resources, retries and stage-1 store (STORAGE/stage1). Running the command
again adds only the (configuration, seed, arm) runs that have no complete trial yet, so Ctrl-C
(or SIGTERM) stops it cleanly (exit 130, saying how many runs were added) and the same command
goes on. At the end it prints the replicated table, and `python -m analysis.report EXPERIMENT`
adds it to report.md.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from typing import Any

from pyarrow import fs as pafs

from analysis.replicates import load_replicates, replicate_markdown, replicate_table
from analysis.trials import NotAnExperiment, aggregate, leaderboard, load_trials, open_experiment
from cmg.config import apply_overrides, cell_config, with_seed
from cmg.errors import OneLineParser, add_quiet_arg, command_parser, exit_on_usage_error, fail
from cmg.results import ARMS, REPLICATE_DIR, TRIAL_PREFIX, is_uri
from tune.space import to_overrides
from tune.trainables import SweepContext, read_context


def build_parser() -> OneLineParser:
    p = command_parser("python -m tune.replicate", __doc__)
    p.add_argument("experiment", help="a finished tune.sweep experiment folder (STORAGE/NAME)")
    p.add_argument("--top", type=int, default=3,
                   help="configurations to replicate, best mean validation AUROC first")
    p.add_argument("--seeds", type=int, default=5, help="new seeds per configuration")
    p.add_argument("--arms", default=",".join(CONTROLS),
                   help="control arms run beside CMG on the same cells, comma-separated: "
                        + "; ".join(f"{a}: {ARMS[a]}" for a in CONTROLS)
                        + " (default: all; 'mixed' alone: CMG only)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="evaluate on up to N images per part (default: the whole validation and "
                        "test sets, whatever the sweep's budget capped); keep it the same when "
                        "adding runs to a replication")
    p.add_argument("--with-defaults", action="store_true",
                   help="also replicate the sweep's first configuration (the reference's "
                        "defaults, complete or not), the one tuning has to beat")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. auto or HOST:6379 (default: a local Ray)")
    add_quiet_arg(p)
    return p


POINT_KEYS = ("source_trial", "seed", "arm")  # what a replicate point adds to a configuration
CONTROLS = tuple(a for a in ARMS if a != "mixed")  # every control arm (cmg.results.ARMS)


def _arm_base(ctx: SweepContext, point: dict[str, Any]):
    """The sweep's base config under the point's seed and arm (cmg.results.ARMS)."""
    return apply_overrides(with_seed(ctx.base, point["seed"]),
                           {"stage2.pseudo_ood": point.get("arm", "mixed")})


def replicate_trainable(config: dict[str, Any], ctx: SweepContext) -> None:
    """The sweep's stage-2 trainable for one (configuration, seed, arm): every (seed, partition)
    cell seeded on its own, stage 1, stage 2 and the train/validation split
    (cmg.config.cell_config: new stage-1 keys per cell, shared by every configuration and arm of
    that cell); the arm sets what stage 2 trains against. Its name names the trial folders
    (cmg.results.REPLICATE_PREFIX)."""
    from tune.trainables import stage2_trainable

    stage2_trainable(_drawn(config), replace(ctx, base=_arm_base(ctx, config), cell_seeds=True))


def _drawn(point: dict[str, Any]) -> dict[str, Any]:
    """A point's configuration parameters (None: a conditional one that was not drawn)."""
    return {k: v for k, v in point.items() if k not in POINT_KEYS and v is not None}


def point_cells(point: dict[str, Any], ctx: SweepContext) -> list[tuple[int, Any]]:
    """The (partition, RunConfig) cells a replicate point runs: the sweep's base under its seed
    and arm, with its parameters, seeded per partition."""
    cfg = apply_overrides(_arm_base(ctx, point), to_overrides(_drawn(point), ctx.space))
    return [(p, cell_config(cfg, p)) for p in ctx.partitions]


def _read_params(experiment: str, trial_id: str) -> dict[str, Any]:
    """The selected trial's parameters exactly as Tune gave them (params.json)."""
    filesystem, root = open_experiment(experiment)
    infos = filesystem.get_file_info(pafs.FileSelector(root))
    folder = next(i.path for i in infos if i.base_name.startswith(f"{TRIAL_PREFIX}_{trial_id}_"))
    with filesystem.open_input_stream(f"{folder}/params.json") as stream:
        return json.loads(stream.read().decode())


def missing_points(experiment: str, top: int, seeds: list[int], with_defaults: bool = False,
                   arms: tuple[str, ...] = ("mixed",)) -> tuple[list[str], list[dict]]:
    """(the top trial ids, ranked on validation, then the first trial's if `with_defaults`; the
    (configuration, seed, arm) points that have no complete replicate trial yet, as trial
    configs)."""
    trials = aggregate(load_trials(experiment))
    board = leaderboard(trials, by="val_auroc").head(top)
    if board.empty:
        fail(f"{experiment} has no complete configuration to replicate; let the sweep finish "
             "(python -m tune.sweep ... --resume)")
    chosen = list(board["trial_id"])
    first = trials.sort_values("trial_number")["trial_id"].iloc[0]
    if with_defaults and first not in chosen:
        chosen.append(first)
    done = load_replicates(experiment)
    have = (set(zip(done["source_trial"], done["seed"], done["arm"])) if not done.empty
            else set())
    points = [{"source_trial": trial_id, "seed": seed, "arm": arm,
               **_read_params(experiment, trial_id)}
              for seed in seeds for trial_id in chosen for arm in arms
              if (trial_id, seed, arm) not in have]
    return chosen, points


def run_replicates(experiment: str, points: list[dict], saved: dict[str, Any], address: str | None,
                   quiet: bool, eval_limit: int | None = None) -> None:
    """The points as Tune trials in EXPERIMENT/replicate, with the sweep's resources and retries,
    evaluated on up to `eval_limit` images per part (None: the whole validation and test sets).
    Raises KeyboardInterrupt after SIGINT or SIGTERM, once Tune has stopped its trials."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune.driver import Interrupts, SweepProgress, quiet_tune
    from tune.placement import stage1_slots
    from tune.prewarm import Prewarm
    from tune.loggers import logger_callbacks
    from tune.shared_stage1 import NAMESPACE, create_leases

    ctx: SweepContext = saved["ctx"]
    ctx = replace(ctx, base=apply_overrides(ctx.base, {"data.eval_limit": eval_limit}))
    quiet_tune()
    ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        interrupts = Interrupts()  # after ray.init, which sets its own SIGTERM handler
        leases = create_leases(ctx.store_uri)  # the store's lease service (detached, shared)
        ray.get(leases.__ray_ready__.remote())
        # the points' stage-1 models (new seeds: new models), each once, as tasks first:
        # otherwise the trials of one seed take turns training them (a lease per model)
        resources = saved["resources"]
        prewarm = Prewarm(ctx, [cell for p in points for cell in point_cells(p, ctx)],
                          resources["cpu"], resources["gpu"], label="replicate")
        prewarm.submit(quiet)
        prewarm.wait_for_slots(stage1_slots(resources["cpu"], resources["gpu"]))
        trainable = tune.with_resources(tune.with_parameters(replicate_trainable, ctx=ctx),
                                        saved["resources"])
        # every key a point sets must exist in the space; a parameter that a configuration did
        # not draw (conditional, e.g. mask_prob) stays None and is dropped by the trainable
        space = {key: None for point in points for key in point}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=BasicVariantGenerator(points_to_evaluate=points),
                num_samples=len(points), reuse_actors=True),
            run_config=tune.RunConfig(
                name=time.strftime("run-%Y%m%d-%H%M%S"),
                storage_path=f"{experiment}/{REPLICATE_DIR}", verbose=0,
                callbacks=[SweepProgress(len(points), quiet, label="replicate",
                                         partitions=len(ctx.partitions)),
                           *logger_callbacks([], experiment, "replicate")],
                failure_config=tune.FailureConfig(max_failures=saved["max_failures"]),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        interrupts.fit(tuner)
        if interrupts.count:
            raise KeyboardInterrupt
        for line in prewarm.finish():
            print(f"[replicate] {line}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.top < 1 or args.seeds < 1:
        fail("--top and --seeds must be at least 1")
    arms = tuple(dict.fromkeys(["mixed", *(a.strip() for a in args.arms.split(",") if a.strip())]))
    if unknown := [a for a in arms if a not in ARMS]:
        fail(f"unknown arm '{unknown[0]}'; choose from {', '.join(ARMS)}")
    experiment = open_experiment(args.experiment)[1] if not is_uri(args.experiment) \
        else args.experiment
    try:
        saved = read_context(experiment)
        sweep_seed = saved["ctx"].base.classifier.seed
        seeds = list(range(sweep_seed + 1, sweep_seed + 1 + args.seeds))
        chosen, points = missing_points(experiment, args.top, seeds, args.with_defaults, arms)
    except NotAnExperiment as err:
        fail(str(err))
    started = time.time()
    if points:
        if not args.quiet:
            print(f"[replicate] {len(points)} (configuration, seed, arm) runs to add: "
                  f"configurations {', '.join(chosen)}, seeds {seeds}, arms {', '.join(arms)}",
                  flush=True)
        try:
            run_replicates(experiment, points, saved, args.address, args.quiet, args.eval_limit)
        except KeyboardInterrupt:
            left = missing_points(experiment, args.top, seeds, args.with_defaults, arms)[1]
            again = ["python", "-m", "tune.replicate", *(sys.argv[1:] if argv is None else argv)]
            print(f"interrupted with {len(points) - len(left)} of {len(points)} runs added; add "
                  f"the rest with: {shlex.join(again)}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    table = replicate_table(load_replicates(experiment), only=chosen, seeds=seeds,
                            selection=load_trials(experiment))
    print(f"replicate {experiment}: {len(points)} runs added in {time.time() - started:.0f} s")
    print(replicate_markdown(table))
    return {"added": len(points), "table": table}


if __name__ == "__main__":
    main(sys.argv[1:])
