"""What every simulated-cluster scenario shares: Ray's own multi-node `Cluster` on this machine,
the project's real sweep driver on it, and a stand-in trial of fixed duration.

    from bench.sim.harness import SimCluster, StandIn, run_sim_sweep, trial_logs

    with SimCluster(nodes=8, cpus_per_node=2, gpus_per_node=1) as cluster:
        standin = StandIn(part_s=2.0, log_dir=work / "logs")
        run = run_sim_sweep(cluster, standin, work / "storage", trials=200, gpus_per_trial=0.5,
                            max_concurrent=cluster.slots(cpus_per_trial=1, gpus_per_trial=0.5))
    logs = trial_logs(standin.log_dir)     # one TrialLog per trial run: pid, node, GPUs, timings
    run.driver_cpu_s, run.wall_s, run.summary, run.experiment

    # or any sweep command line of your own on the cluster, with the stand-in training:
    spec, _, _ = tune.sweep.build_spec([..., "--address", cluster.address])
    tune.driver.run_sweep(spec, trial_fn=standin.make)

Real: the driver (`tune.sweep.build_spec` + `tune.driver.run_sweep`: Ray Tune, the Optuna
searcher and its journal, the scheduler, checkpoints, result files, the stage-1 lease actor) and
the cluster (a head with 0 CPUs, N raylets with logical CPUs and GPUs: no hardware needed).
Stand-in: the training. Each trial sleeps `part_s` per partition, then writes what the real
trial writes, of the real sizes (`trial.json`, a scores file and a head file per partition, its
rows file, a checkpoint of the partitions done), and reports to Tune what
`tune.trainables.stage2_trainable` reports (`full_report=True`: every key, as the sweep did
before `cmg.results.TUNE_KEYS`; `heads_in_checkpoint=True`: every finished partition's head in
each checkpoint, as it did before heads got their own files). It imports neither torch nor the project's trainables, so a
trial process stays small (~0.25 GB).
The stand-in times each `tune.report` call (how long the trial blocks) and its own start and end;
the scenario turns those into slot gaps, block times and throughput.

The loopback cluster shares this machine's cores with the driver: figures measure how the
driver's cost grows with nodes and trials, not network bandwidth.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cmg.results import (ALL_METRICS, ROWS_FILE, TRIAL_FILE, TUNE_KEYS, checkpoint_head_file,
                         head_file, partition_mean_std, scores_file)

# a lost node is noticed within ~3 s (as tests/test_cluster.py does), not Ray's default 30 s
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}
# dozens of raylets on 2 cores: no idle worker processes started ahead of need (one per logical
# CPU otherwise), and minutes, not Ray's 60 s, for a trial process to start when 64 start at once
CROWDED_MACHINE = {"enable_worker_prestart": False, "worker_register_timeout_seconds": 600}
OBJECT_STORE_BYTES = 75 << 20  # Ray's minimum: dozens of raylets on one machine
# the real files' sizes: a partition's scores table, one selected stage-2 head (state dict)
SCORES_BYTES = 256 << 10
HEAD_BYTES = 1_070_000


class SimCluster:
    """A head with 0 CPUs (only the driver and the lease actor live there, as on a real
    cluster) and `nodes` worker nodes with logical CPUs and GPUs; a context manager that shuts
    everything down on exit. `address` is what `--address` takes."""

    def __init__(self, nodes: int, cpus_per_node: int = 2, gpus_per_node: int = 1):
        self.nodes, self.cpus_per_node, self.gpus_per_node = nodes, cpus_per_node, gpus_per_node
        self._cluster = None

    def __enter__(self) -> "SimCluster":
        from ray.cluster_utils import Cluster

        self._cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES,
            "_system_config": {**FAST_FAILURE_DETECTION, **CROWDED_MACHINE}})
        try:
            for _ in range(self.nodes):
                self._cluster.add_node(num_cpus=self.cpus_per_node, num_gpus=self.gpus_per_node,
                                       object_store_memory=OBJECT_STORE_BYTES)
            self._cluster.wait_for_nodes()
        except BaseException:
            self._cluster.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cluster.shutdown()

    @property
    def address(self) -> str:
        return self._cluster.address

    def slots(self, cpus_per_trial: float, gpus_per_trial: float) -> int:
        """Trials that fit at once."""
        per_node = self.cpus_per_node // cpus_per_trial
        if gpus_per_trial > 0:
            per_node = min(per_node, self.gpus_per_node // gpus_per_trial)
        return int(per_node) * self.nodes


@dataclass(frozen=True)
class TrialLog:
    """One run of a stand-in trial (a retried trial has one per run): wall-clock times
    (`time.time()`), `reports` as (called, returned) pairs of `tune.report`."""

    trial_id: str
    pid: int
    node: str
    gpu_ids: list
    start: float
    end: float
    restored: int  # partitions restored from the trial's checkpoint
    reports: list[tuple[float, float]] = field(default_factory=list)
    parts: list[tuple[float, float]] = field(default_factory=list)  # each partition's stage 2


@dataclass(frozen=True)
class StandIn:
    """The stand-in training: `part_s` seconds per partition, the real files and reports.
    `make(spec, gpus)` is what `tune.driver.run_sweep(..., trial_fn=...)` takes."""

    part_s: float
    log_dir: Path  # one TrialLog JSON per trial run (the loopback nodes share this disk)
    scores_bytes: int = SCORES_BYTES
    head_bytes: int = HEAD_BYTES
    # report the whole row to Tune, as the sweep did before cmg.results.TUNE_KEYS (a baseline)
    full_report: bool = False
    # every finished partition's head in each checkpoint, as the sweep did before heads got
    # their own files (a baseline: tune.report then persisted up to 5 MB per report)
    heads_in_checkpoint: bool = False
    # stage 1 before each partition, as the real trial does (waits for, or trains, its models);
    # None: no stage 1 (the trial process then imports neither torch nor the project's tune/)
    stage1: "Stage1StandIn | None" = None

    def make(self, spec, gpus: float) -> Callable[[dict], None]:
        """The trial function for the sweep `spec` (tune.spec.SweepSpec: its partitions; with
        `stage1`, what the trial's stage-1 keys need: setting, base config, space, store,
        name)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        standin, partitions = self, tuple(spec.partitions)
        where = (Stage1Where(spec.setting, spec.base, spec.space, spec.stage1_store,
                             spec.options.name) if self.stage1 else None)

        def stage2_trainable(config: dict) -> None:
            standin.run_trial(config, partitions, where)

        return stage2_trainable

    def run_trial(self, config: dict, partitions: tuple[int, ...],
                  where: "Stage1Where | None" = None) -> None:
        import ray
        from ray import tune

        start = time.time()
        context = tune.get_context()
        storage = context.get_storage()
        trial_fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
        done: list[dict] = []
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                done = json.loads((Path(folder) / "partitions.json").read_text())
        restored = len(done)
        _put(trial_fs, f"{trial_path}/{TRIAL_FILE}",
             json.dumps({"config": config, "partitions": list(partitions)}).encode())
        node = ray.get_runtime_context().get_node_id()
        quality = random.Random(json.dumps(config, sort_keys=True, default=str)).random()
        reports, parts = [], []
        for partition in partitions[len(done):]:
            if self.stage1 is not None:
                self.stage1.for_trial(where, config, partition,
                                      f"{where.name}/{context.get_trial_id()}")
            parts.append((time.time(), 0.0))
            time.sleep(self.part_s)
            parts[-1] = (parts[-1][0], time.time())
            _put(trial_fs, f"{trial_path}/{scores_file(partition)}", bytes(self.scores_bytes))
            if not self.heads_in_checkpoint:
                _put(trial_fs, f"{trial_path}/{head_file(partition)}", bytes(self.head_bytes))
            done.append({"partition": partition,
                         "metrics": {m: quality for m in ALL_METRICS}})
            done[-1]["row"] = _row(done, len(partitions), context.get_trial_id(), node, restored)
            _put(trial_fs, f"{trial_path}/{ROWS_FILE}",
                 "".join(json.dumps(r["row"]) + "\n" for r in done).encode())
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "partitions.json").write_text(json.dumps(done))
                for r in done if self.heads_in_checkpoint else ():
                    (Path(folder) / checkpoint_head_file(r["partition"])).write_bytes(
                        bytes(self.head_bytes))
                row = done[-1]["row"]
                metrics = row if self.full_report else {k: row[k] for k in TUNE_KEYS}
                called = time.time()
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
                reports.append((called, time.time()))
        log = TrialLog(context.get_trial_id(), os.getpid(), node, list(ray.get_gpu_ids()), start,
                       time.time(), restored, reports, parts)
        name = f"{log.trial_id}-{log.pid}-{int(start * 1e6)}.json"
        (self.log_dir / name).write_text(json.dumps(asdict(log)))


def _put(filesystem, target: str, data: bytes) -> None:
    """Write a file on the trial's storage as tune.artifacts.put_bytes does (that module imports
    torch, which the stand-in's processes must not load)."""
    filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(f"{target}.tmp") as out:
        out.write(data)
    filesystem.move(f"{target}.tmp", target)


def _row(done: list[dict], total: int, trial_id: str, node: str,
         restored: int) -> dict[str, Any]:
    """The full row tune.trainables.stage2_trainable writes after a partition (the same keys)."""
    last = done[-1]
    aggregate = {}
    for name in last["metrics"]:
        aggregate[f"{name}_mean"], aggregate[f"{name}_std"] = partition_mean_std(
            r["metrics"][name] for r in done)
    return {"trial_id": trial_id, "partitions_done": len(done), "partitions_total": total,
            "partition": last["partition"], **last["metrics"], **aggregate,
            "stage1_key": "0" * 16, "stage1_trained": 0, "stage1_trained_total": 0,
            "selected_epoch": 1, "stage1_s": 0.0, "stage1_train_s": 0.0, "stage2_s": 0.0,
            "scores_s": 0.0, "node_id": node, "restored_partitions": restored}


def trial_logs(log_dir: Path) -> list[TrialLog]:
    """Every stand-in trial run's log, by start time."""
    logs = [json.loads(p.read_text()) for p in Path(log_dir).glob("*.json")]
    return sorted((TrialLog(**{**d, "reports": [tuple(r) for r in d["reports"]],
                               "parts": [tuple(r) for r in d.get("parts", [])]}) for d in logs),
                  key=lambda t: t.start)


@dataclass(frozen=True)
class Stage1Where:
    """What a stand-in trial needs of the sweep context to find its stage-1 keys."""

    setting: str
    base: Any  # cmg.config.RunConfig
    space: dict
    store_uri: str
    name: str


@dataclass(frozen=True)
class Stage1StandIn:
    """The stand-in stage-1 training: `train_s` seconds per model, then the artifact's meta.json
    and training-log entry, under the store's real lease service (`tune.shared_stage1.train_once`:
    one trainer per key, the others wait). Called as a prewarm task (`run_sweep(...,
    stage1_fn=...)`) and by `StandIn` trials before each partition. Each training it does is
    logged to `log_dir/stage1-*.json` (kind, key, owner, start, end)."""

    train_s: float
    log_dir: Path

    def __call__(self, spec, gpus: float, kind: str, partition: int, cfg) -> dict:  # prewarm
        owner = f"{spec.options.name}/prewarm-{kind}-p{partition}"
        trained = self.ensure(spec.setting, spec.stage1_store, kind, partition, cfg, owner)
        return {"trained": trained, "seconds": self.train_s if trained else 0.0}

    def for_trial(self, where: Stage1Where, config: dict, partition: int, owner: str) -> None:
        from cmg.config import apply_overrides
        from tune.space import to_overrides

        cfg = apply_overrides(where.base, to_overrides(config, where.space))
        for kind in ("classifier", "cvae"):
            self.ensure(where.setting, where.store_uri, kind, partition, cfg, owner)

    def ensure(self, setting: str, store_uri: str, kind: str, partition: int, cfg,
               owner: str) -> bool:
        from tune.artifacts import ArtifactStore, stage1_keys
        from tune.leases import get_leases
        from tune.shared_stage1 import train_once

        store = ArtifactStore(store_uri)
        key = getattr(stage1_keys(setting, partition, cfg), kind)

        def train(check: Callable[[], None]) -> None:
            start = time.time()
            store.log_training(key, {"owner": owner})
            time.sleep(self.train_s)
            store.write_json(key, "meta.json", {"key": key, "kind": kind, "partition": partition,
                                                "trained_by": owner})
            record = {"kind": kind, "key": key, "owner": owner, "start": start, "end": time.time()}
            (self.log_dir / f"stage1-{key}-{os.getpid()}-{int(start * 1e6)}.json").write_text(
                json.dumps(record))

        return train_once(get_leases(store_uri), key, owner, lambda: store.exists(key), train,
                          poll_seconds=0.2)


@dataclass(frozen=True)
class SweepRun:
    """A sweep the harness ran: its summary, wall and driver CPU seconds (this process: Tune's
    loop, the searcher, the snapshots; not the raylets), the host's busy fraction meanwhile
    (all cores, other users included) and the experiment folder."""

    summary: dict
    wall_s: float
    driver_cpu_s: float
    host_busy: float
    experiment: Path


def run_sim_sweep(cluster: SimCluster, standin: StandIn, storage: Path, trials: int,
                  gpus_per_trial: float, max_concurrent: int, cpus_per_trial: float = 1,
                  extra_args: Iterable[str] = ()) -> SweepRun:
    """The project's sweep on `cluster` with the stand-in training: a synthetic CIFAR setting,
    smoke budget, no stage-1 prewarm, no scheduler (every trial runs all partitions), the
    default search space and sampler."""
    from tune.driver import run_sweep
    from tune.sweep import build_spec

    spec, _, _ = build_spec([
        "--setting", "synthetic_cifar10", "--budget", "smoke", "--quiet", "--no-prewarm",
        "--scheduler", "none", "--address", cluster.address, "--storage", str(storage),
        "--name", "sim", "--num-samples", str(trials), "--gpus-per-trial", str(gpus_per_trial),
        "--cpus-per-trial", str(cpus_per_trial), "--max-concurrent", str(max_concurrent),
        *extra_args])
    busy_before, cpu_before, started = _host_busy(), _self_cpu(), time.monotonic()
    summary = run_sweep(spec, trial_fn=standin.make)
    wall = time.monotonic() - started
    busy, total = (a - b for a, b in zip(_host_busy(), busy_before))
    return SweepRun(summary, wall, _self_cpu() - cpu_before, busy / total if total else math.nan,
                    Path(spec.experiment))


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _host_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole host so far (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def snapshot_bytes(experiment: Path) -> int:
    """Bytes of Tune's experiment snapshot (experiment_state-*.json, the searcher's pickle)."""
    return sum(p.stat().st_size for pattern in ("experiment_state-*.json", "searcher-state-*.pkl")
               for p in experiment.glob(pattern))
