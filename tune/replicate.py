"""`python -m tune.replicate EXPERIMENT`: re-run a finished sweep's best configurations with new
seeds, beside their control arms, so that their numbers carry seed variance as well as partition
variance and say what class mixing adds.

    python -m tune.replicate experiments/same_dataset_mnist-CMG-energy-demo --top 1
    python -m tune.replicate EXPERIMENT --top 3 --seeds 5 --with-defaults --arms none,single
    python -m tune.replicate EXPERIMENT --top 1 --arms none --variant stage2.label_smoothing=0

The top configurations are ranked on validation (mean `val_auroc` over the partitions, complete
configurations only); `--with-defaults` adds the sweep's first configuration (the reference's
defaults, even if early stopping cut it short), so that tuned CMG is compared with default CMG
on the same seeds. Each runs on every partition once per new seed (seeds S+1 .. S+SEEDS, where S
is the sweep's `--seed`) and per arm (cmg.results.ARMS: CMG, and by default every control:
training the head against single-class pseudo-OOD, noise, or nothing). An arm that the sweep
searched in its own study (tune.sweep --arms) runs its own top configurations, each paired with
CMG's of the same rank (`paired_with`, the CMG trial it is compared with on the same cells); an
arm it did not search runs CMG's configurations.
Every (seed, partition) cell is seeded on its own (cmg.config.cell_config): stage 1, stage 2 and
the train/validation split, so cells are independent draws; the cell's stage-1 models are
trained once and shared by every configuration and arm of that cell. Replicates are scored on
the whole validation and test sets (`--eval-limit N` caps them). The sweep's own run (seed
S) is not counted: it is the run the configuration was selected on.
The trials are Ray Tune trials in EXPERIMENT/replicate/run-<time>/replicate-<n>-<id>/ (one Tune
run per call), with the sweep's spec (its manifest.json), CPUs, retries and stage-1 store
(STORAGE/stage1), and a GPU share planned on the cluster it runs on. Running the command again
adds only the (configuration, seed, arm) runs that have no complete trial yet, so Ctrl-C (or
SIGTERM) stops it cleanly (exit 130, saying how many runs were added) and the same command goes
on; `--seeds` may grow (`--seeds 2` after `--seeds 1` adds seed S+2 alone: a long replication
in parts, one seed's stage-1 models at a time, as scripts/headline.sh runs it). At the end it
prints the replicated table (analysis.replicates), and `python -m analysis.report EXPERIMENT`
adds it to report.md.
`--variant KEY=VALUE` runs the named arms (--arms; CMG only if named) once more with overrides of
the sweep's config, a variant recorded beside their plain runs ("none + stage2.label_smoothing=0":
head re-training without stage 1's label smoothing, to see how much of re-training's effect is
the smoothing undone), on the same cells and stage-1 models.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import replace
from typing import Any, Callable

from cmg.config import apply_overrides, cell_config, with_seed
from cmg.errors import OneLineParser, add_quiet_arg, command_parser, exit_on_usage_error, fail
from cmg.results import (ARM_PREFIX, ARMS, REPLICATE_DIR, REPLICATE_KIND, Experiment,
                         NotAnExperiment, TrialFolder, variant_arm)
from tune.artifacts import ArtifactStore, Stage1Keys
from tune.manifest import manifest_arms, spec_from_manifest
from tune.space import to_overrides
from tune.spec import SweepSpec


def build_parser() -> OneLineParser:
    p = command_parser("python -m tune.replicate", __doc__)
    p.add_argument("experiment", help="a finished tune.sweep experiment folder (STORAGE/NAME)")
    p.add_argument("--top", type=int, default=3,
                   help="configurations to replicate, best mean validation AUROC first")
    p.add_argument("--seeds", type=int, default=5, help="new seeds per configuration")
    p.add_argument("--arms", default=",".join(CONTROLS),
                   help="control arms run beside CMG on the same cells (an arm the sweep "
                        "searched, tune.sweep --arms: at its own study's best; another: at "
                        "CMG's configurations), comma-separated: "
                        + "; ".join(f"{a}: {ARMS[a]}" for a in CONTROLS)
                        + " (default: all; 'mixed' alone: CMG only)")
    p.add_argument("--variant", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="run the --arms named (CMG only if named) as a variant with this override "
                        "of the sweep's config, beside their plain runs, e.g. --arms none "
                        "--variant stage2.label_smoothing=0; repeatable; not a knob the sweep "
                        "searched")
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


# what a replicate point adds to a configuration: the sweep trial whose configuration it runs,
# the seed, the arm, for an arm run at its own study's configuration the CMG trial it is compared
# with (the same rank in CMG's study; absent: `source_trial` is CMG's), and a variant's overrides
# (tune.replicate --variant, joined by ";"; absent: the plain arm)
POINT_KEYS = ("source_trial", "seed", "arm", "paired_with", "variant")
CONTROLS = tuple(a for a in ARMS if a != "mixed")  # every control arm (cmg.results.ARMS)


def _arm_base(spec: SweepSpec, point: dict[str, Any]):
    """The sweep's base config under the point's seed, arm (cmg.results.ARMS) and variant."""
    variant = point.get("variant")
    return apply_overrides(with_seed(spec.base, point["seed"]),
                           [f"stage2.pseudo_ood={point.get('arm', 'mixed')}",
                            *(variant.split(";") if variant else [])])


def replicate_trainable(config: dict[str, Any], spec: SweepSpec, gpus: float) -> None:
    """The sweep's stage-2 trainable for one (configuration, seed, arm): every (seed, partition)
    cell seeded on its own, stage 1, stage 2 and the train/validation split
    (cmg.config.cell_config: new stage-1 keys per cell, shared by every configuration and arm of
    that cell); the arm sets what stage 2 trains against."""
    from tune.trainables import stage2_trainable

    stage2_trainable(_drawn(config), replace(spec, base=_arm_base(spec, config)), gpus,
                     cell_seeds=True)


def _drawn(point: dict[str, Any]) -> dict[str, Any]:
    """A point's configuration parameters (None: a conditional one that was not drawn)."""
    return {k: v for k, v in point.items() if k not in POINT_KEYS and v is not None}


def point_cells(point: dict[str, Any], spec: SweepSpec) -> list[tuple[int, Any]]:
    """The (partition, RunConfig) cells a replicate point runs: the sweep's base under its seed
    and arm, with its parameters, seeded per partition."""
    cfg = apply_overrides(_arm_base(spec, point), to_overrides(_drawn(point), spec.space))
    return [(p, cell_config(cfg, p)) for p in spec.partitions]


def open_sweep(experiment: str) -> tuple[Experiment, SweepSpec]:
    """The experiment and the spec its manifest records; NotAnExperiment if it has none."""
    exp = Experiment.open(experiment)
    if exp.manifest is None:
        raise NotAnExperiment(f"{experiment} has no manifest.json: pass a folder that "
                              "tune.sweep wrote (STORAGE/NAME)")
    return exp, spec_from_manifest(exp.manifest)


def arm_study(exp: Experiment, arm: str) -> Experiment | None:
    """The study in which the sweep searched `arm`'s configurations: the experiment itself for
    its base arm (CMG's), EXPERIMENT/arm-ARM for another it swept (tune.sweep --arms), None for
    an arm it did not search."""
    swept = manifest_arms(exp.manifest) if exp.manifest else ("mixed",)
    if arm not in swept:
        return None
    if arm == swept[0]:
        return exp
    return Experiment(exp.path(ARM_PREFIX + arm), exp.filesystem, exp.path(ARM_PREFIX + arm))


def chosen_runs(exp: Experiment, top: int, with_defaults: bool = False,
                arms: tuple[str, ...] = ("mixed",)) -> tuple[list[TrialFolder], list[tuple]]:
    """(CMG's chosen trials: its top `top` on validation (Experiment.ranked), then its first
    trial if `with_defaults`; the (study, trial, arm, paired_with) runs of each seed): an arm the
    sweep searched runs its own top `top`, paired with CMG's of the same rank; another runs CMG's
    chosen trials."""
    ranked, trials = exp.ranked(), exp.trials()
    if not ranked:
        fail(f"{exp.location} has no complete configuration to replicate; let the sweep finish "
             "(python -m tune.sweep ... --resume)")
    chosen = ranked[:top]
    if with_defaults and trials[0] not in chosen:
        chosen.append(trials[0])
    runs = []
    for arm in arms:
        study = arm_study(exp, arm)
        if study is None or study is exp:
            runs += [(exp, folder, arm, None) for folder in chosen]
            continue
        own = study.ranked()[:top]
        if not own:
            fail(f"the {arm} arm's study {study.location} has no complete configuration; let "
                 "the sweep finish (python -m tune.sweep ... --resume)")
        runs += [(study, folder, arm, cmg.trial_id) for folder, cmg in zip(own, ranked)]
    return chosen, runs


def points_to_add(exp: Experiment, runs: list[tuple], seeds: list[int],
                  variant: str = "", store: ArtifactStore | None = None) -> list[dict]:
    """The (configuration, seed, arm) points of `runs` (`chosen_runs`) x `seeds`, as `variant`
    (overrides joined by ";", "" for none) runs them, that have no complete replicate trial yet,
    as trial configs. With `store` (the stage-1 store), a trial whose rows ran on other weights
    than the store now holds for their keys (models trained again, on another machine, after
    the store that trained them was lost) counts as missing: the arms of a cell are compared on
    one classifier, so it runs again on this store's."""
    have = set()  # the (configuration, seed, arm or variant) runs a complete trial holds
    # the weights the store holds now, per row's `stage1_key` (read once per key)
    weights = functools.cache(lambda key: store.weights_id(Stage1Keys.parse(key)))
    for run in exp.replicate_runs():
        folders = run.trials(REPLICATE_KIND)
        for folder, rows in zip(folders, run.each(run.complete_rows, folders)):
            if rows is not None and not (store and _stale(rows, weights)):
                p = run.params(folder)
                have.add((p["source_trial"], p["seed"],
                          variant_arm(p.get("arm", "mixed"), p.get("variant"))))
    return [{"source_trial": folder.trial_id, "seed": seed, "arm": arm,
             **({"paired_with": paired} if paired else {}),
             **({"variant": variant} if variant else {}), **study.params(folder)}
            for seed in seeds for study, folder, arm, paired in runs
            if (folder.trial_id, seed, variant_arm(arm, variant)) not in have]


def _stale(rows: list[dict], weights: Callable[[str], str | None]) -> bool:
    """Some row ran on stage-1 weights other than `weights(its stage1_key)`, those the store
    holds now (a key it does not hold yet, or a row from before weights were recorded, is not
    stale)."""
    return any(row.get("stage1_weights") and weights(row["stage1_key"]) not in
               (None, row["stage1_weights"]) for row in rows)


def run_replicates(exp: Experiment, spec: SweepSpec, points: list[dict], address: str | None,
                   quiet: bool, eval_limit: int | None = None) -> None:
    """The points as Tune trials in EXPERIMENT/replicate, with the sweep's CPUs and retries and a
    GPU share planned on this cluster, evaluated on up to `eval_limit` images per part (None: the
    whole validation and test sets). Raises KeyboardInterrupt after SIGINT or SIGTERM, once Tune
    has stopped its trials."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune.driver import SweepProgress
    from tune.loggers import logger_callbacks
    from tune.placement import plan_placement, stage1_slots
    from tune.prewarm import Prewarm
    from tune.session import name_trial_folders, ray_session

    spec = replace(spec, base=apply_overrides(spec.base, {"data.eval_limit": eval_limit}))
    options = spec.options
    with ray_session(address, spec.stage1_store) as interrupts:
        placement = plan_placement(options.cpus_per_trial, options.gpus_per_trial,
                                   options.max_concurrent, len(points))
        gpus = placement.gpus
        # the points' stage-1 models (new seeds: new models), each once, as tasks first:
        # otherwise the trials of one seed take turns training them (a lease per model)
        prewarm = Prewarm(spec, [cell for p in points for cell in point_cells(p, spec)],
                          options.cpus_per_trial, gpus, label="replicate")
        prewarm.submit(quiet)
        prewarm.wait_for_slots(stage1_slots(options.cpus_per_trial, gpus))
        trainable = tune.with_resources(
            tune.with_parameters(replicate_trainable, spec=spec, gpus=gpus),
            {"cpu": options.cpus_per_trial, "gpu": gpus})
        # every key a point sets must exist in the space; a parameter that a configuration did
        # not draw (conditional, e.g. mask_prob) stays None and is dropped by the trainable
        space = {key: None for point in points for key in point}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=BasicVariantGenerator(points_to_evaluate=points),
                num_samples=len(points), reuse_actors=True,
                trial_dirname_creator=name_trial_folders(REPLICATE_KIND)),
            run_config=tune.RunConfig(
                name=time.strftime("run-%Y%m%d-%H%M%S"),
                storage_path=exp.path(REPLICATE_DIR), verbose=0,
                callbacks=[SweepProgress(len(points), quiet, label="replicate",
                                         partitions=len(spec.partitions)),
                           *logger_callbacks([], exp.location, "replicate")],
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        interrupts.fit(tuner)
        if interrupts.count:
            raise KeyboardInterrupt
        for line in prewarm.finish():
            print(f"[replicate] {line}", file=sys.stderr, flush=True)


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.top < 1 or args.seeds < 1:
        fail("--top and --seeds must be at least 1")
    named = [a.strip() for a in args.arms.split(",") if a.strip()]
    # a variant runs the arms named; plain runs always have CMG's beside the controls
    arms = tuple(dict.fromkeys(named if args.overrides else ["mixed", *named]))
    if unknown := [a for a in arms if a not in ARMS]:
        fail(f"unknown arm '{unknown[0]}'; choose from {', '.join(ARMS)}")
    try:
        exp, spec = open_sweep(args.experiment)
        variant = variant_of(args.overrides, spec)
        sweep_seed = spec.base.classifier.seed
        seeds = list(range(sweep_seed + 1, sweep_seed + 1 + args.seeds))
        chosen, runs = chosen_runs(exp, args.top, args.with_defaults, arms)
        store = ArtifactStore(spec.stage1_store)
        points = points_to_add(exp, runs, seeds, variant, store)
    except NotAnExperiment as err:
        fail(str(err))
    chosen = [folder.trial_id for folder in chosen]
    started, added = time.time(), 0
    if points and not args.quiet:
        own = [f"{arm} {folder.trial_id}" for _, folder, arm, paired in runs if paired]
        print(f"[replicate] {len(points)} (configuration, seed, arm) runs to add: "
              f"configurations {', '.join(chosen)}, seeds {seeds}, arms {', '.join(arms)}"
              + (f" with {variant.replace(';', ', ')}" if variant else "")
              + (f" (each at its own study's best: {', '.join(own)})" if own else ""),
              flush=True)
    for _ in range(2):  # once more for runs found on stage-1 models this store trained again
        if not points:
            break
        try:
            run_replicates(exp, spec, points, args.address, args.quiet, args.eval_limit)
        except KeyboardInterrupt:
            from tune.session import exit_interrupted

            left = points_to_add(exp, runs, seeds, variant, store)
            exit_interrupted(f"with {added + len(points) - len(left)} of {added + len(points)} "
                             "runs added", ["python", "-m", "tune.replicate",
                                            *(sys.argv[1:] if argv is None else argv)])
        added += len(points)
        points = [p for p in points_to_add(exp, runs, seeds, variant, store) if p not in points]
        if points and not args.quiet:
            print(f"[replicate] {len(points)} runs again: they ran on stage-1 models that this "
                  "store has trained again (other weights), and a cell's arms are compared on "
                  "one classifier", flush=True)
    # the report of what was added (analysis reads the files; tune only wrote them)
    from analysis.replicates import load_replicates, replicate_markdown, replicate_table
    from analysis.trials import load_trials

    table = replicate_table(filed_under_cmg(load_replicates(exp.location), runs, variant),
                            only=chosen,
                            seeds=seeds, selection=load_trials(exp.location))
    print(f"replicate {exp.location}: {added} runs added in {time.time() - started:.0f} s")
    print(replicate_markdown(table))
    return {"added": added, "table": table}


def variant_of(overrides: list[str], spec: SweepSpec) -> str:
    """--variant's overrides as a variant: "KEY=VALUE" of each, as the config holds the value,
    sorted and joined by ";" ("" for none), so that `=0` and `=0.0` name one variant. Each must
    be a known stage-2 key (a variant re-trains the head on the plain runs' stage-1 models) with
    a valid value, not the arm and not a knob the sweep searched (each point would set it back
    to its own value); else a one-line error."""
    cfg = apply_overrides(spec.base, overrides)  # unknown keys and bad values: one line, exit 2
    searched = {"stage2.mode", *(param.key for param in spec.space.values())}
    keys = sorted({o.partition("=")[0].strip() for o in overrides})
    for key in keys:
        if not key.startswith("stage2."):
            fail(f"--variant {key}: a variant changes stage 2 only (the cell's stage-1 models "
                 "are the plain runs'); use a stage2.* key")
        if key == "stage2.pseudo_ood":
            fail("--variant stage2.pseudo_ood: --arms names the arms a variant runs")
        if key in searched:
            fail(f"--variant {key}: the sweep searched it, so every configuration sets its own; "
                 "a variant overrides only what the sweep kept fixed")
    items = [f"{key}={getattr(cfg.stage2, key.removeprefix('stage2.'))}" for key in keys]
    if any(";" in item for item in items):
        fail("--variant: a value may not hold ';' (it joins a variant's overrides)")
    return ";".join(items)


def filed_under_cmg(df, runs: list[tuple], variant: str = ""):
    """The replicate rows of `runs` (`chosen_runs`, run as `variant`), an arm's own configuration
    filed under the CMG configuration it is compared with (`paired_with`), so that the table sets
    each arm's own best beside CMG's on the same cells; with a variant, CMG's plain runs of those
    configurations as well (its lifts are read against them)."""
    keep = {(folder.trial_id, variant_arm(arm, variant)): paired or folder.trial_id
            for _, folder, arm, paired in runs}
    if variant:
        keep.update({(cmg, "mixed"): cmg for cmg in set(keep.values())})
    key = list(zip(df["source_trial"], df["arm"]))
    return df[[k in keep for k in key]].assign(
        source_trial=[keep[k] for k in key if k in keep])


if __name__ == "__main__":
    main(sys.argv[1:])
