"""The sweep's driver: Ray, the stage-1 prewarm, the Optuna-searched Tuner, resume, summary.

`tune.sweep` validates the input and builds the sweep's spec (tune.spec.SweepSpec) first, and
only then calls `run_sweep(spec)`, so bad input never starts Ray or leaves a half-made
experiment folder.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from cmg.progress import Progress
from cmg.results import OBJECTIVE, TRIAL_KIND, Experiment, is_uri
from tune.artifacts import KINDS, ArtifactStore
from tune.loggers import logger_callbacks
from tune.placement import plan_placement
from tune.search import SweepSearch, fail_orphans, prune_stopped, sweep_searcher
from tune.spec import SweepSpec
from tune.prewarm import Prewarm, every_partition, reachable_configs
from tune.session import Interrupts, name_trial_folders, ray_session
from tune.trainables import stage2_trainable


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM stopped the sweep; Ray Tune saved its state. `done`: configurations
    finished (complete, pruned or failed in the study)."""

    def __init__(self, done: int):
        super().__init__(f"interrupted after {done} configurations")
        self.done = done


class SweepProgress(tune.Callback):
    """A line per trial start, finished partition and finished trial, with the ETA of the whole
    run; nothing with quiet=True."""

    def __init__(self, total: int, quiet: bool, label: str = "sweep", partitions: int = 5,
                 finished: int = 0, best: float = float("nan")):
        """`finished` and `best` (validation AUROC) carry over what a resumed run restored."""
        self.bar = Progress(label, total, quiet, every=0, done_before=finished)
        self.partitions = partitions
        self.quiet, self.finished, self.best = quiet, finished, best
        self.failures: set[str] = set()  # the error lines printed

    def on_trial_start(self, iteration, trials, trial, **info):
        if not self.quiet:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in trial.config.items())
            print(f"[trial {trial.trial_id}] started: {params}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
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
        why = _error_line(trial)
        if why not in self.failures:  # once per cause, whatever --quiet says: 64 trials on a
            self.failures.add(why)  # node without CUDA fail alike
            print(f"[trial {trial.trial_id}] failed: {why}", file=sys.stderr, flush=True)
        self._finish(trial)


def _error_line(trial) -> str:
    """The last line of a failed trial's error (Ray's traceback ends with the exception), from
    the driver's copy of its error file (the storage's comes with the next sync)."""
    path = trial.error_file
    text = Path(path).read_text() if path and os.path.exists(path) else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error recorded"


def _trained_by(store_uri: str, name: str) -> dict[str, int]:
    """Stage-1 models of each kind that the experiment NAME trained (in any run of it, by any
    task or trial, including trials that failed after training them): their meta.json says
    `trained_by: NAME/...`."""
    store = ArtifactStore(store_uri)
    metas = [store.read_json(key) for key in store.keys()]
    return {kind: sum(m.get("kind") == kind and m.get("trained_by", "").startswith(f"{name}/")
                      for m in metas) for kind in KINDS}


def _study_progress(spec: SweepSpec) -> tuple[int, float]:
    """(configurations the study holds as finished: complete, pruned or failed; the best
    objective of a complete one, NaN if none)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=spec.options.name, storage=spec.study_storage())
    except KeyError:  # interrupted before the search created it
        return 0, float("nan")
    trials = study.get_trials(deepcopy=False)
    values = [t.value for t in trials if t.state == TrialState.COMPLETE]
    return sum(t.state.is_finished() for t in trials), max(values, default=float("nan"))


def _summary(results, name: str, experiment: str, trained: dict[str, int],
             partitions: int) -> dict[str, Any]:
    trials = {"total": 0, "complete": 0, "pruned": 0, "failed": 0}
    reused = 0
    best = None
    for r in results:
        trials["total"] += 1
        df = r.metrics_dataframe
        if df is not None and "stage1_trained" in df:
            reused += int(len(df) - df["stage1_trained"].sum())
        last = r.metrics or {}
        if r.error is not None:
            trials["failed"] += 1
        elif last.get("partitions_done") == partitions:
            trials["complete"] += 1
            if best is None or last[OBJECTIVE] > best.metrics[OBJECTIVE]:
                best = r
        else:  # stopped by ASHA: told PRUNED to the study
            trials["pruned"] += 1
    summary: dict[str, Any] = {
        "name": name, "experiment": experiment, "trials": trials,
        "stage1_trained": sum(trained.values()), "stage1_trained_by_kind": trained,
        "stage1_reused": reused, "best": None}
    if best is not None:  # its full last row: Tune got only cmg.results.TUNE_KEYS
        row = Experiment(best.path, best.filesystem, best.path).rows(best.path)[-1]
        keep = ["partitions_done"] + [k for k in row if k.endswith(("_mean", "_std"))]
        summary["best"] = {"trial_id": best.metrics.get("trial_id"), "params": best.config,
                           # JSON has no NaN: the sd of one partition is written as null
                           "metrics": {k: _finite_or_none(row[k]) for k in keep}}
    return summary


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_sweep(spec: SweepSpec, restore: bool = False,
              trial_fn: Callable[[SweepSpec, float], Callable[[dict], None]] | None = None,
              stage1_fn: Callable[..., dict] | None = None) -> dict[str, Any]:
    """Run (or, with `restore`, continue from Tune's saved state) the sweep; return its summary.
    Raises SweepInterrupted after SIGINT/SIGTERM (Tune's state saved, the study untouched).
    `trial_fn(spec, gpus)`: the function each trial runs (default: tune.trainables'
    stage2_trainable; bench/sim passes a stand-in of fixed duration); `stage1_fn`: the function
    each prewarm task runs (default: tune.trainables.stage1_task)."""
    started = time.monotonic()  # --time-budget counts from here, the stage-1 prewarm included
    ArtifactStore(spec.stage1_store).check_format()
    if not is_uri(spec.experiment):  # the study's journal lives there (tune.sweep made it)
        Path(spec.experiment).mkdir(parents=True, exist_ok=True)
    try:
        with ray_session(spec.options.address, spec.stage1_store) as interrupts:
            summary = _search(spec, restore, interrupts, started, trial_fn, stage1_fn)
    # outside Tune's loop (ray.shutdown included: a signal there once escaped as a traceback),
    # or a second signal: stop at once
    except KeyboardInterrupt:
        raise SweepInterrupted(_study_progress(spec)[0]) from None
    return summary


def _search(spec: SweepSpec, restore: bool, interrupts: Interrupts, started: float,
            trial_fn: Callable[[SweepSpec, float], Callable[[dict], None]] | None,
            stage1_fn: Callable[..., dict] | None) -> dict[str, Any]:
    options, experiment, name = spec.options, spec.experiment, spec.options.name
    # judged by the node types an autoscaling cluster can add, not only the nodes up now
    placement = plan_placement(options.cpus_per_trial, options.gpus_per_trial,
                               options.max_concurrent, options.num_samples,
                               options.wait_for_nodes)
    if not options.quiet and (options.address or placement.gpus):
        for line in placement.lines:
            print(f"[sweep] {line}", flush=True)
    gpus = placement.gpus
    resources = {"cpu": options.cpus_per_trial, "gpu": gpus}
    prewarm = Prewarm(spec, every_partition(spec, reachable_configs(spec.base, spec.space)),
                      options.cpus_per_trial, gpus, stage1_fn)
    if options.prewarm:  # the search starts once a stage-1 task's slot would idle
        prewarm.submit(options.quiet)
        prewarm.wait_for_slots(placement.stage1_slots)
    run_trial = (trial_fn(spec, gpus) if trial_fn
                 else tune.with_parameters(stage2_trainable, spec=spec, gpus=gpus))
    trainable = tune.with_resources(run_trial, resources)
    finished, best = _study_progress(spec) if restore else (0, float("nan"))
    callbacks = [SweepProgress(options.num_samples, options.quiet,
                               partitions=len(spec.partitions), finished=finished, best=best),
                 *logger_callbacks(list(options.loggers), experiment, name)]
    if "tensorboard" in options.loggers and not options.quiet:
        print(f"[sweep] TensorBoard: tensorboard --logdir {experiment}", flush=True)
    # The experiment state (every trial's status and results, what a resume reads) is
    # snapshotted once a minute. Keeping N checkpoints would force a snapshot, and a wait on the
    # previous one, after every N checkpoints of a trial: O(trials) per report, during which
    # tune.report blocks. So every checkpoint is kept (one per partition; the last holds all of
    # the trial's heads), and a driver lost between snapshots redoes at most a minute of work.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "60")
    # the run is named by the experiment's last folder, not NAME: an arm's study (NAME/arm-ARM,
    # tune.sweep --arms) nested in Tune's name is not where Tuner.restore looks for its files
    storage_path, _, run_name = experiment.rpartition("/")
    run_config = tune.RunConfig(
        name=run_name, storage_path=storage_path, verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    if restore:
        SweepSearch.grow_to = options.num_samples  # --num-samples may grow on resume
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Tuner.restore brings back the run config pickled when the sweep began, callbacks and
        # all: a progress line with that process's counts, --quiet and monotonic clock (after a
        # reboot, a negative elapsed time and ETA). This run's own replace them (Ray 2.60 takes
        # no run config on restore).
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        searcher = sweep_searcher(spec)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(spec.partitions),
                                   grace_period=1, reduction_factor=2)
                     if options.scheduler == "asha" else None)
        tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
            # without the limiter Tune keeps one trial pending: the autoscaler would see the
            # demand of one trial at a time and add one node per boot
            search_alg=SweepSearch(ConcurrencyLimiter(searcher, placement.max_concurrent)),
            scheduler=scheduler, num_samples=options.num_samples, metric=OBJECTIVE,
            mode="max", reuse_actors=True,  # keep warm processes: imports, data, caches
            trial_dirname_creator=name_trial_folders(TRIAL_KIND),
            time_budget_s=(max(1.0, options.time_budget - (time.monotonic() - started))
                           if options.time_budget else None)))
    search_started = time.monotonic()
    results = interrupts.fit(tuner)
    search_seconds = time.monotonic() - search_started
    if interrupts.count:
        raise SweepInterrupted(_study_progress(spec)[0])
    for line in prewarm.finish():  # models no trial needed may still train
        print(f"[sweep] {line}", file=sys.stderr, flush=True)
    summary = _summary(results, name, experiment, _trained_by(spec.stage1_store, name),
                       len(spec.partitions))
    summary["resources"] = resources  # per trial, as planned on this cluster
    # what a user compares with another machine: the search, from its first trial to its last,
    # and the training time of the stage-1 models the prewarm trained (beside the search), summed
    summary["seconds"] = {"search": round(search_seconds, 1),
                          "stage1_training": round(prewarm.seconds, 1)}
    storage = spec.study_storage()
    summary["study"] = {
        "name": name,
        "stopped_pruned": prune_stopped(storage, name, [r.metrics for r in results
                                                        if r.error is None and r.metrics]),
        "orphans_failed": fail_orphans(storage, name)}
    return summary
