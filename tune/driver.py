"""The sweep's driver: Ray, the stage-1 prewarm, the Optuna-searched Tuner, resume, summary.

`tune.sweep` validates the input first and only then calls `run_sweep`, so bad input never
starts Ray or leaves a half-made experiment folder.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from cmg.config import RunConfig
from cmg.progress import Progress
from tune.artifacts import ArtifactStore, stage1_key
from tune.space import Param, suggest
from tune.stage1 import NAMESPACE, create_leases
from tune.trainables import (OBJECTIVE, SweepContext, stage1_trainable, stage2_trainable,
                             write_context)

class SweepProgress(tune.Callback):
    """A line per trial start, stage-1 epoch, finished partition and finished trial, with the
    ETA of the whole run; nothing with quiet=True."""

    def __init__(self, total: int, quiet: bool, label: str = "sweep", partitions: int = 5):
        self.bar = Progress(label, total, quiet, every=0)
        self.partitions = partitions
        self.quiet, self.finished, self.best = quiet, 0, float("nan")

    def on_trial_start(self, iteration, trials, trial, **info):
        if not self.quiet:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in trial.config.items())
            print(f"[trial {trial.trial_id}] started: {params}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.quiet and result.get("model") in ("classifier", "cvae"):
            kind = result["model"]
            print(f"[stage 1, partition {result['partition']}] {kind} epoch {result['epoch']}: "
                  f"loss {result[kind + '_loss']:.4f}", flush=True)
        if not self.quiet and "partitions_done" in result:
            print(f"[trial {trial.trial_id}] partition {result['partition']} "
                  f"({result['partitions_done']}/{self.partitions}): "
                  f"val AUROC {result['val_auroc']:.4f}, running mean {result[OBJECTIVE]:.4f}",
                  flush=True)

    def _finish(self, trial):
        self.finished += 1
        last = trial.last_result or {}
        if last.get("partitions_done") == self.partitions:
            value = last[OBJECTIVE]
            self.best = value if not self.best >= value else self.best
        best = {} if self.best != self.best else {"best_val_auroc": self.best}  # not NaN
        self.bar.update(self.finished, force=True, trials=f"{self.finished}/{self.bar.total}",
                        **best)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial)


def _prewarm(ctx: SweepContext, experiment: str, resources: dict, quiet: bool) -> None:
    """Train the base config's stage-1 models of all partitions in parallel."""
    store = ArtifactStore(ctx.store_uri)
    missing = [p for p in ctx.partitions if not store.exists(
        stage1_key(ctx.setting, p, ctx.base, ctx.backbone))]
    if not missing:
        return
    if not quiet:
        print(f"[sweep] training stage 1 of partitions {missing} in parallel", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(stage1_trainable, ctx=ctx), resources),
        param_space={"partition": tune.grid_search(missing)},
        run_config=tune.RunConfig(
            name="stage1", storage_path=experiment, verbose=0,
            callbacks=[SweepProgress(len(missing), quiet, label="stage 1")],
            failure_config=tune.FailureConfig(max_failures=2)))
    tuner.fit()


def _trained_by(store_uri: str, name: str) -> int:
    """Stage-1 models that the experiment NAME trained (in any run of it, by any trial, including
    trials that failed after training them): their meta.json says `trained_by: NAME/...`."""
    store = ArtifactStore(store_uri)
    return sum(store.read_json(key).get("trained_by", "").startswith(f"{name}/")
               for key in store.keys())


def _fail_orphans(study_factory: Callable, study_name: str) -> int:
    """Mark study trials that a killed driver left RUNNING as FAIL; return how many."""
    import optuna
    from optuna.trial import TrialState

    storage = study_factory()
    study = optuna.load_study(study_name=study_name, storage=storage)
    orphans = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in orphans:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(orphans)


def _summary(results, name: str, experiment: str, trained: int,
             partitions: int) -> dict[str, Any]:
    trials = {"total": 0, "complete": 0, "stopped": 0, "errored": 0}
    reused = 0
    best = None
    for r in results:
        trials["total"] += 1
        df = r.metrics_dataframe
        if df is not None and "stage1_trained" in df:
            reused += int(len(df) - df["stage1_trained"].sum())
        last = r.metrics or {}
        if r.error is not None:
            trials["errored"] += 1
        elif last.get("partitions_done") == partitions:
            trials["complete"] += 1
            if best is None or last[OBJECTIVE] > best.metrics[OBJECTIVE]:
                best = r
        else:
            trials["stopped"] += 1
    summary: dict[str, Any] = {
        "name": name, "experiment": experiment, "trials": trials,
        "stage1_trained": trained, "stage1_reused": reused, "best": None}
    if best is not None:
        keep = ["partitions_done"] + [k for k in best.metrics if k.endswith(("_mean", "_std"))]
        summary["best"] = {"trial_id": best.metrics.get("trial_id"), "params": best.config,
                           # JSON has no NaN: the sd of one partition is written as null
                           "metrics": {k: _finite_or_none(best.metrics[k]) for k in keep}}
    return summary


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_sweep(args, setting, modes: tuple[str, ...], base: RunConfig, space: dict[str, Param],
              data_root: str, storage: str, name: str, first: dict[str, Any],
              study_factory: Callable, ood_sets: tuple = (), backbone=None) -> dict[str, Any]:
    # the experiment state is saved after every partition on purpose: not a bottleneck here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if args.quiet:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(address=args.address, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        gpus = args.gpus_per_trial
        if gpus is None:
            gpus = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        resources = {"cpu": args.cpus_per_trial, "gpu": gpus}
        experiment = "/".join([storage, name])
        ctx = SweepContext(setting=setting.name, budget=args.budget, base=base, space=space,
                           partitions=tuple(setting.partitions),
                           store_uri="/".join([storage, "stage1"]),
                           data_root=data_root, use_gpu=gpus > 0,
                           threads=max(1, int(args.cpus_per_trial)),
                           ood_datasets=args.ood_dataset, ood_sets=ood_sets, backbone=backbone,
                           name=name, compile_model=args.compile)
        leases = create_leases()  # the actor lives as long as this handle
        ray.get(leases.__ray_ready__.remote())
        if "://" not in experiment:
            Path(experiment).mkdir(parents=True, exist_ok=True)
        write_context(experiment, ctx, resources, args.max_failures)  # for tune.replicate
        if args.prewarm:
            _prewarm(ctx, experiment, resources, args.quiet)
        trainable = tune.with_resources(tune.with_parameters(stage2_trainable, ctx=ctx), resources)
        callbacks = [SweepProgress(args.num_samples, args.quiet, partitions=len(ctx.partitions))]
        run_config = tune.RunConfig(
            name=name, storage_path=storage, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
        if args.resume:
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            searcher = OptunaSearch(
                space=functools.partial(suggest, space=space, modes=modes), metric=OBJECTIVE, mode="max",
                points_to_evaluate=[first], seed=args.seed, study_name=name,
                storage=study_factory())
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(ctx.partitions),
                                       grace_period=1, reduction_factor=2)
                         if args.scheduler == "asha" else None)
            tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
                search_alg=(ConcurrencyLimiter(searcher, args.max_concurrent)
                            if args.max_concurrent else searcher),
                scheduler=scheduler, num_samples=args.num_samples, metric=OBJECTIVE,
                mode="max", reuse_actors=True))  # keep warm processes: imports, data, caches
        results = tuner.fit()
        summary = _summary(results, name, experiment, _trained_by(ctx.store_uri, name),
                           len(ctx.partitions))
        summary["study"] = {"name": name, "orphans_failed": _fail_orphans(study_factory, name)}
        return summary
    finally:
        ray.shutdown()
