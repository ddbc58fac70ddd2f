"""Ray Tune trainables: stage 1 for one partition, stage 2 for one configuration over all five.

The stage-2 trainable runs the partitions in a fixed order and, after each one, writes that
partition's full row to the trial's `partitions.jsonl` (cmg.results.ROWS_FILE: its metrics, CMG
and every baseline, val and test, and the running mean and standard deviation of every metric
over the partitions done so far) and reports a few of its keys to Tune (cmg.results.TUNE_KEYS,
so the driver's state stays small with thousands of trials). `val_auroc_mean` is the objective;
ASHA can stop a configuration after one or two partitions. A checkpoint after every partition
holds the finished partitions, so a retried trial (a crash, a lost node) continues with the next
partition; every report names the Ray node it ran on (`node_id`) and how many partitions the
trial restored from its checkpoint when it (re)started (`restored_partitions`).

Each trial folder (on the sweep's storage, local or a pyarrow URI) also holds `trial.json` (the
trial's resolved RunConfig, setting, budget, stage-1 store and data: what `tune.export` and the
report's reproduce command need) and `scores/partition-N.parquet` (every evaluated image's
scores, `cmg.score_table`) and `heads/partition-N.pt` (the selected stage-2 head, so the winning
detector can be exported). The checkpoint holds only the partitions done (a few KB: tune.report
waits while it is persisted; the heads were in it once, up to 5 MB a report).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from pyarrow.fs import FileType
from ray import tune

from cmg.config import DataConfig, RunConfig, apply_overrides, cell_config
from cmg.data import get_setting, import_setting_modules, make_split
from cmg.pipeline import flat_metrics, result_dict
from cmg.results import (ROWS_FILE, TRIAL_FILE, TUNE_KEYS, head_file, partition_mean_std,
                         scores_file)
from cmg.score_table import score_table, to_parquet_bytes
from cmg.stage1 import TrainingDiverged
from cmg.stage2 import run_stage2
from tune.artifacts import ArtifactStore, put_bytes
from tune.space import to_overrides
from tune.leases import get_leases, node_id
from tune.shared_stage1 import SharedStage1
from tune.spec import SweepSpec

DIVERGED_FILE = "diverged.txt"  # in a trial folder: why its configuration diverged
# set to 1 on the nodes of a simulated cluster whose GPUs are Ray's logical ones (no hardware:
# tests/test_cold_cluster.py): trials and stage-1 tasks given GPUs train on the CPU
LOGICAL_GPUS = "CMG_LOGICAL_GPUS"


class NoCuda(RuntimeError):
    """Ray gave this process GPUs and torch sees none: it would train on the CPU, the most
    expensive way for a GPU cluster to fail."""


def _device(spec: SweepSpec, gpus: float) -> torch.device:
    """The trial's device, with torch's threads set to the trial's CPUs. A trial (or a prewarm
    task) given GPUs on a node where torch has no CUDA fails here, before any training, in one
    line: a driver too old for torch's CUDA, a CPU-only torch, a node without its GPUs."""
    torch.set_num_threads(max(1, int(spec.options.cpus_per_trial)))
    if gpus <= 0 or os.environ.get(LOGICAL_GPUS) == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only build")
        raise NoCuda(f"given {gpus:g} GPU on node "
                     f"{ray.util.get_node_ip_address()} but torch {torch.__version__} ({build}) "
                     "finds no CUDA device there: check `nvidia-smi` on that node (an NVIDIA "
                     "driver too old for this CUDA?), or run with --gpus-per-trial 0")
    return torch.device("cuda")


@functools.lru_cache(maxsize=5)
def _split(setting: str, partition: int, data: DataConfig, device: str, data_root: str,
           ood_datasets: str):
    return make_split(setting, partition, data, data_root, ood_datasets=ood_datasets).to(device)


def split_for(spec: SweepSpec, partition: int, device: torch.device,
              data: DataConfig | None = None):
    """The partition's tensors on the device (split by `data`, default the sweep's), loaded once
    per worker process."""
    import_setting_modules(spec.modules)  # a user's setting registers itself on import
    split = _split(spec.setting, partition, data or spec.base.data, str(device),
                   spec.options.data_root, spec.options.ood_dataset)
    if split.ood_sets != spec.ood_sets:  # this node's data root differs from the driver's
        raise RuntimeError(f"OOD sets on this node {split.ood_sets} differ from the driver's "
                           f"{spec.ood_sets}; give every node the same data")
    return split


def shared_stage1(spec: SweepSpec, owner: str) -> SharedStage1:
    """The sweep's stage-1 store, the caller training what is missing: its lease holder, and
    `trained_by: NAME/OWNER` in the models' meta.json."""
    return SharedStage1(ArtifactStore(spec.stage1_store), get_leases(spec.stage1_store),
                        f"{spec.options.name}/{owner}", spec.backbone, spec.options.compile)


def stage1_task(spec: SweepSpec, gpus: float, kind: str, partition: int,
                cfg: RunConfig) -> dict[str, Any]:
    """A prewarm task (tune.prewarm): train one stage-1 model, "classifier" or "cvae", of `cfg`
    for a partition, unless the store has it; its lease holder is NAME/prewarm-KIND-pN."""
    device = _device(spec, gpus)
    split = split_for(spec, partition, device, cfg.data)
    shared = shared_stage1(spec, f"prewarm-{kind}-p{partition}")
    trained, seconds = shared.ensure_one(kind, split, cfg, device)
    return {"kind": kind, "partition": partition, "trained": trained, "seconds": seconds,
            "node_id": node_id()}


def trial_record(spec: SweepSpec, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """`trial.json`: what it takes to rebuild a trial's detector or rerun one of its partitions."""
    import_setting_modules(spec.modules)  # a user's setting registers itself on import
    return {"setting": spec.setting, "family": get_setting(spec.setting).family,
            "budget": spec.options.budget, "device": device.type,
            "threads": torch.get_num_threads(), "config": cfg.to_dict(),
            "partitions": list(spec.partitions), "stage1_store": spec.stage1_store,
            "data_root": spec.options.data_root, "data_root_given": spec.options.data_root_given,
            "ood_datasets": spec.options.ood_dataset,
            "backbone": ({"path": spec.backbone.path, **spec.backbone.identity()}
                         if spec.backbone else None)}


def running_aggregate(records: list[dict[str, float]]) -> dict[str, float]:
    """`<key>_mean` and `<key>_std` of every flat metric over the partitions done so far
    (cmg.results.partition_mean_std, as analysis.aggregate computes them from the files)."""
    out = {}
    for name in records[0]:
        out[f"{name}_mean"], out[f"{name}_std"] = partition_mean_std(r[name] for r in records)
    return out


def stage2_trainable(config: dict[str, Any], spec: SweepSpec, gpus: float,
                     cell_seeds: bool = False) -> None:
    """One configuration of SPEC, stage 2 on every partition in order, a report after each;
    `gpus`: the trial's (resolved against the cluster). `cell_seeds` (tune.replicate): each
    partition seeded on its own (cmg.config.cell_config), the split included."""
    device = _device(spec, gpus)
    cfg = apply_overrides(spec.base, to_overrides(config, spec.space))
    done: list[dict[str, Any]] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / "partitions.json").read_text())
    restored = len(done)
    storage = tune.get_context().get_storage()  # the trial folder on the sweep's storage
    trial_fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
    put_bytes(trial_fs, f"{trial_path}/{TRIAL_FILE}",
              json.dumps(trial_record(spec, cfg, device)).encode())
    diverged = f"{trial_path}/{DIVERGED_FILE}"  # a diverged configuration diverges again:
    if trial_fs.get_file_info(diverged).type != FileType.NotFound:  # Tune's retry fails at once
        with trial_fs.open_input_stream(diverged) as reason:
            raise TrainingDiverged(reason.readall().decode())
    shared = shared_stage1(spec, tune.get_context().get_trial_id() or "driver")
    for partition in spec.partitions[len(done):]:
        started = time.perf_counter()
        cell = cell_config(cfg, partition) if cell_seeds else cfg
        split = split_for(spec, partition, device, cell.data)
        try:
            models = shared.ensure(split, cell, device)
            stage1_s = time.perf_counter() - started
            result = run_stage2(models.classifier, models.cvae, split, cell.stage2, device,
                                cell.classifier.amp, quiet=True, features=models.features)
        except TrainingDiverged as err:
            put_bytes(trial_fs, diverged, str(err).encode())
            raise
        seconds = {"stage1": stage1_s, "stage1_train": models.train_seconds,
                   "stage2": time.perf_counter() - started - stage1_s}
        scores_started = time.perf_counter()
        table = score_table(models.classifier, result, models.features, split,
                            cfg.stage2.mode)
        put_bytes(trial_fs, f"{trial_path}/{scores_file(partition)}", to_parquet_bytes(table))
        seconds["scores"] = time.perf_counter() - scores_started
        head = io.BytesIO()
        torch.save(result.head, head)
        put_bytes(trial_fs, f"{trial_path}/{head_file(partition)}", head.getvalue())
        record = {"partition": partition, "stage1_key": str(models.keys),
                  "stage1_weights": shared.store.weights_id(models.keys),
                  "stage1_trained": models.trained, "selected_epoch": result.selected_epoch,
                  "metrics": flat_metrics(result_dict(split, cell, result, seconds)),
                  "seconds": seconds}
        done.append(record)
        record["row"] = {  # the full row: in ROWS_FILE, and in the checkpoint for a retry
            "trial_id": tune.get_context().get_trial_id(),
            "partitions_done": len(done), "partitions_total": len(spec.partitions),
            "partition": partition,
            **record["metrics"], **running_aggregate([r["metrics"] for r in done]),
            "stage1_key": str(models.keys), "stage1_weights": record["stage1_weights"],
            "stage1_trained": record["stage1_trained"],
            "stage1_trained_total": sum(r["stage1_trained"] for r in done),
            "selected_epoch": result.selected_epoch,
            "stage1_s": seconds["stage1"], "stage1_train_s": seconds["stage1_train"],
            "stage2_s": seconds["stage2"], "scores_s": seconds["scores"],
            "node_id": node_id(),
            "restored_partitions": restored,
        }
        # (a partition restored from a checkpoint written before ROWS_FILE existed has no row
        # here: its full row is in result.json, where cmg.results.Experiment.rows finds it)
        put_bytes(trial_fs, f"{trial_path}/{ROWS_FILE}",
                  "".join(json.dumps(r["row"]) + "\n" for r in done if "row" in r).encode())
        with tempfile.TemporaryDirectory() as folder:  # a few KB: tune.report persists it
            (Path(folder) / "partitions.json").write_text(json.dumps(done))
            tune.report({k: record["row"][k] for k in TUNE_KEYS},
                        checkpoint=tune.Checkpoint.from_directory(folder))
