"""The stage-1 prewarm: every stage-1 model a sweep can reach, trained once, first, as Ray tasks.

A sweep's trials reach one classifier per partition and one CVAE per (searched latent size,
partition): `reachable_configs` enumerates the stage-1 knobs of the space that take a few values
(choices, a fixed value, a small integer range; a continuous one keeps the base value, and a trial
that draws another trains that model itself). `Prewarm` submits one Ray task per missing model,
partition by partition (so the first partition's models are ready first), each with its own
resources: a whole GPU where there are GPUs, a trial's CPUs. The search starts once fewer models
are left than such tasks run at once (from then on a task's slot would idle, so trials take it)
and every model left is in training: its task holds the key's lease. Ray has no priorities
between tasks and trials, so a trial submitted while a stage-1 task still waits for a GPU (on a
cold cluster, until the first GPU node boots) could take that GPU first and train the model inside
its slot. Holding the trials back costs nothing on a warm cluster and, on a cold one, only the
minutes until the tasks' nodes are up (the autoscaler sees the tasks' demand first); the trials
that reach a model still in training then wait for it under its lease (train once), on GPUs no
stage-1 task needs.

    cells = every_partition(spec, reachable_configs(spec.base, spec.space))
    prewarm = Prewarm(spec, cells, cpus=1, gpus=0)
    prewarm.submit(quiet=False)           # "[sweep] training 15 stage-1 models (...)"
    prewarm.wait_for_slots(slots=2)       # returns with at most 1 model left, in training
    ...                                   # the search
    prewarm.finish()                      # the rest; a failed model: one line, not an error

`task(spec, gpus, kind, partition, cfg)` is `tune.trainables.stage1_task` (bench/sim passes a
stand-in of fixed duration).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import ray

from cmg.config import RunConfig, apply_overrides
from cmg.progress import Progress
from tune.artifacts import KINDS, ArtifactStore, stage1_keys
from tune.space import Param
from tune.spec import SweepSpec

STAGE1_SECTIONS = ("classifier.", "cvae.", "data.")  # knobs that change a stage-1 model
MAX_VALUES = 8  # an integer range with more values than this is not prewarmed


def stage1_values(param: Param) -> tuple | None:
    """The values a stage-1 knob can take, if few (None: too many to train ahead)."""
    if param.is_fixed:
        return (param.fixed,)
    if param.kind == "cat":
        return tuple(param.choices)
    if param.kind == "int" and not param.log and param.high - param.low < MAX_VALUES:
        return tuple(range(int(param.low), int(param.high) + 1))
    return None


def reachable_configs(base: RunConfig, space: dict[str, Param]) -> list[RunConfig]:
    """The base config under every combination of the space's enumerable stage-1 knobs (the
    base config itself first)."""
    knobs = {p.key: values for p in space.values()
             if p.key.startswith(STAGE1_SECTIONS) and (values := stage1_values(p)) is not None}
    configs = [base]
    for combo in itertools.product(*knobs.values()):
        cfg = apply_overrides(base, dict(zip(knobs, combo)))
        if cfg not in configs:
            configs.append(cfg)
    return configs


@dataclass(frozen=True)
class Job:
    kind: str  # "classifier" or "cvae"
    partition: int
    cfg: RunConfig
    key: str


def every_partition(spec: SweepSpec, configs: list[RunConfig]) -> list[tuple[int, RunConfig]]:
    """The (partition, config) cells of a sweep: each config on every partition."""
    return [(partition, cfg) for partition in spec.partitions for cfg in configs]


def missing_jobs(spec: SweepSpec, cells: list[tuple[int, RunConfig]]) -> list[Job]:
    """One job per stage-1 key that the (partition, config) cells need and the store lacks,
    partition by partition, each partition's classifiers first."""
    store = ArtifactStore(spec.stage1_store)
    jobs: dict[str, Job] = {}
    for partition in spec.partitions:
        for kind in KINDS:
            for cfg in (cfg for p, cfg in cells if p == partition):
                key = getattr(stage1_keys(spec.setting, partition, cfg, spec.backbone), kind)
                if key not in jobs and not store.exists(key):
                    jobs[key] = Job(kind, partition, cfg, key)
    return list(jobs.values())


def _run_job(task: Callable[..., dict], spec: SweepSpec, gpus: float, kind: str, partition: int,
             cfg: RunConfig) -> dict:
    """A prewarm task's body (`task` may be any callable; Ray's tasks must be functions)."""
    return task(spec, gpus, kind, partition, cfg)


@dataclass
class Prewarm:
    """The prewarm of one sweep (or tune.replicate run): submit, wait for free slots, finish."""

    spec: SweepSpec
    cells: list[tuple[int, RunConfig]]  # (partition, stage-1 config): `every_partition`
    cpus: float
    gpus: float  # a trial's share; a stage-1 task takes a whole GPU if this is above 0
    task: Callable | None = None  # default: tune.trainables.stage1_task
    label: str = "sweep"
    jobs: list[Job] = field(default_factory=list)
    _pending: dict = field(default_factory=dict)  # ObjectRef -> Job
    _bar: Progress | None = None
    _failed: list[tuple[str, str]] = field(default_factory=list)  # (model, cause)
    seconds: float = 0.0  # the training time of the models its tasks trained, added up

    def submit(self, quiet: bool) -> int:
        """Start a task for every missing model; returns how many."""
        from tune.trainables import stage1_task

        self.jobs = missing_jobs(self.spec, self.cells)
        if not self.jobs:
            return 0
        remote = ray.remote(_run_job).options(
            num_cpus=self.cpus, num_gpus=1 if self.gpus > 0 else 0,
            # a lost node reruns the task (it resumes from the store's per-epoch checkpoint);
            # an error in training is the model's, and trials that need it will show it
            max_retries=-1, retry_exceptions=False)
        task = self.task or stage1_task
        self._pending = {remote.remote(task, self.spec, self.gpus, job.kind, job.partition,
                                       job.cfg): job
                         for job in self.jobs}
        classifiers = sum(job.kind == "classifier" for job in self.jobs)
        partitions = sorted({job.partition for job in self.jobs})
        self._bar = Progress("stage 1", len(self.jobs), quiet, every=0)
        if not quiet:
            print(f"[{self.label}] training {len(self.jobs)} stage-1 models ({classifiers} "
                  f"classifiers, {len(self.jobs) - classifiers} CVAEs) of partitions "
                  f"{partitions}, each a task of {self.cpus:g} CPU"
                  f"{' and 1 GPU' if self.gpus > 0 else ''}", flush=True)
        return len(self.jobs)

    def wait_for_slots(self, slots: int) -> None:
        """Return once fewer than `slots` models are left (from then on a slot would idle) and
        each of them is in training (its key published or its lease held: a trial that needs it
        waits instead of training it)."""
        from tune.leases import get_leases

        leases = get_leases(self.spec.stage1_store)
        while len(self._pending) >= max(1, slots) or not all(ray.get(leases.taken.remote(
                [job.key for job in self._pending.values()]))):
            self._collect(timeout=1.0)

    def finish(self) -> list[str]:
        """Wait for the models still in training (models no trial needed: the search is over);
        returns a line per cause of failure (20 models on a node without CUDA: one line)."""
        if self._pending:
            _, training = ray.wait(list(self._pending), num_returns=len(self._pending),
                                   timeout=0)
            if training:
                self._bar.update(len(self.jobs) - len(self._pending), force=True,
                                 waiting=f"for {len(training)} models no trial needed")
            while self._pending:
                self._collect(timeout=1.0, show=bool(training))
        causes: dict[str, list[str]] = {}
        for model, cause in self._failed:
            causes.setdefault(cause, []).append(model)
        return [f"stage-1 {models[0]} failed: {cause}" if len(models) == 1 else
                f"{len(models)} stage-1 models failed ({models[0]} and {len(models) - 1} more): "
                f"{cause}" for cause, models in causes.items()]

    def _collect(self, timeout: float, show: bool = True) -> None:
        done, _ = ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        for ref in done:
            job = self._pending.pop(ref)
            try:
                self.seconds += ray.get(ref)["seconds"] or 0.0
            except ray.exceptions.RayTaskError as err:
                cause = str(err.cause if err.cause is not None else err).strip().splitlines()
                self._failed.append((f"{job.kind} of partition {job.partition} ({job.key})",
                                     cause[-1] if cause else type(err).__name__))
            finished = len(self.jobs) - len(self._pending)
            if show:
                self._bar.update(finished, force=True, models=f"{finished}/{len(self.jobs)}",
                                 last=f"{job.kind}-p{job.partition}")
