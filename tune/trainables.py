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
scores, `cmg.scores`); the checkpoint keeps each partition's selected stage-2 head
(`head-partition-N.pt`), so the winning detector can be exported.
"""

from __future__ import annotations

import functools
import json
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyarrow.fs import FileType
from ray import tune

from cmg.backbone import BackboneSpec
from cmg.config import DataConfig, RunConfig, apply_overrides, cell_config
from cmg.data import get_setting, import_setting_modules, make_split
from cmg.pipeline import flat_metrics, result_dict
from cmg.results import (CONTEXT_FILE, ROWS_FILE, TRIAL_FILE, TUNE_KEYS, head_file,
                         partition_mean_std, scores_file)
from cmg.scores import score_table, to_parquet_bytes
from cmg.stage1 import TrainingDiverged
from cmg.stage2 import run_stage2
from tune.artifacts import ArtifactStore, put_bytes
from tune.space import Param, to_overrides
from tune.shared_stage1 import SharedStage1, get_leases, node_id

DIVERGED_FILE = "diverged.txt"  # in a trial folder: why its configuration diverged


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (passed with tune.with_parameters)."""

    setting: str
    budget: str
    base: RunConfig
    space: dict[str, Param]
    partitions: tuple[int, ...]
    store_uri: str
    data_root: str
    use_gpu: bool
    threads: int
    ood_datasets: str = "all"  # Setting 2: the OOD sets to evaluate on
    ood_sets: tuple[tuple[str, int, int], ...] = ()  # Setting 2: their layout, as the driver found it
    backbone: BackboneSpec | None = None  # an external model in place of the stage-1 classifier
    name: str = ""  # the experiment's name: stage-1 models it trains record "NAME/TRIAL_ID"
    compile_model: bool = False  # torch.compile stage-1 training (--compile)
    setting_modules: tuple[str, ...] = ()  # imported before the setting is looked up (user's own)
    # tune.replicate: each partition seeded on its own (cmg.config.cell_config), split included
    cell_seeds: bool = False




def write_context(experiment: str, ctx: SweepContext, resources: dict, max_failures: int) -> None:
    """Keep the sweep's context, trial resources and retries in the experiment folder, so that
    `tune.replicate` runs more trials exactly like the sweep's."""
    blob = pickle.dumps({"ctx": ctx, "resources": resources, "max_failures": max_failures})
    ArtifactStore(experiment).write_bytes("", CONTEXT_FILE, blob)


def read_context(experiment: str) -> dict[str, Any]:
    """`write_context`'s dict: {"ctx", "resources", "max_failures"}."""
    from analysis.trials import NotAnExperiment

    store = ArtifactStore(experiment)
    if not store.exists("", CONTEXT_FILE):
        raise NotAnExperiment(f"{experiment} has no {CONTEXT_FILE}: pass a folder that "
                              "tune.sweep wrote (STORAGE/NAME), from this version on")
    return pickle.loads(store.read_bytes("", CONTEXT_FILE))


def _device(ctx: SweepContext) -> torch.device:
    torch.set_num_threads(max(1, ctx.threads))
    return torch.device("cuda" if ctx.use_gpu and torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=5)
def _split(setting: str, partition: int, data: DataConfig, device: str, data_root: str,
           ood_datasets: str):
    return make_split(setting, partition, data, data_root, ood_datasets=ood_datasets).to(device)


def split_for(ctx: SweepContext, partition: int, device: torch.device,
              data: DataConfig | None = None):
    """The partition's tensors on the device (split by `data`, default the sweep's), loaded once
    per worker process."""
    import_setting_modules(ctx.setting_modules)  # a user's setting registers itself on import
    split = _split(ctx.setting, partition, data or ctx.base.data, str(device), ctx.data_root,
                   ctx.ood_datasets)
    if split.ood_sets != ctx.ood_sets:  # this node's data root differs from the driver's
        raise RuntimeError(f"OOD sets on this node {split.ood_sets} differ from the driver's "
                           f"{ctx.ood_sets}; give every node the same data")
    return split


def shared_stage1(ctx: SweepContext) -> SharedStage1:
    """The sweep's stage-1 store, this trial training what is missing (its lease holder, and
    `trained_by: NAME/TRIAL_ID` in the models' meta.json)."""
    owner = f"{ctx.name}/{tune.get_context().get_trial_id() or 'driver'}"
    return SharedStage1(ArtifactStore(ctx.store_uri), get_leases(ctx.store_uri), owner,
                        ctx.backbone, ctx.compile_model)


def stage1_task(ctx: SweepContext, kind: str, partition: int, cfg: RunConfig) -> dict[str, Any]:
    """A prewarm task (tune.prewarm): train one stage-1 model, "classifier" or "cvae", of `cfg`
    for a partition, unless the store has it; its lease holder is NAME/prewarm-KIND-pN."""
    device = _device(ctx)
    split = split_for(ctx, partition, device, cfg.data)
    shared = SharedStage1(ArtifactStore(ctx.store_uri), get_leases(ctx.store_uri),
                          f"{ctx.name}/prewarm-{kind}-p{partition}", ctx.backbone,
                          ctx.compile_model)
    trained, seconds = shared.ensure_one(kind, split, cfg, device)
    return {"kind": kind, "partition": partition, "trained": trained, "seconds": seconds,
            "node_id": node_id()}


def trial_record(ctx: SweepContext, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """`trial.json`: what it takes to rebuild a trial's detector or rerun one of its partitions."""
    import_setting_modules(ctx.setting_modules)  # a user's setting registers itself on import
    return {"setting": ctx.setting, "family": get_setting(ctx.setting).family,
            "budget": ctx.budget, "device": device.type, "threads": torch.get_num_threads(),
            "config": cfg.to_dict(),
            "partitions": list(ctx.partitions), "stage1_store": ctx.store_uri,
            "data_root": ctx.data_root, "ood_datasets": ctx.ood_datasets,
            "backbone": ({"path": ctx.backbone.path, **ctx.backbone.identity()}
                         if ctx.backbone else None)}


def running_aggregate(records: list[dict[str, float]]) -> dict[str, float]:
    """`<key>_mean` and `<key>_std` of every flat metric over the partitions done so far
    (cmg.results.partition_mean_std, as analysis.aggregate computes them from the files)."""
    out = {}
    for name in records[0]:
        out[f"{name}_mean"], out[f"{name}_std"] = partition_mean_std(r[name] for r in records)
    return out


def stage2_trainable(config: dict[str, Any], ctx: SweepContext) -> None:
    """One configuration, stage 2 on every partition in order; a report after each."""
    device = _device(ctx)
    cfg = apply_overrides(ctx.base, to_overrides(config, ctx.space))
    done: list[dict[str, Any]] = []
    heads: dict[int, dict[str, torch.Tensor]] = {}  # partition -> selected stage-2 head
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / "partitions.json").read_text())
            heads = {r["partition"]: torch.load(Path(folder) / head_file(r["partition"]),
                                                 weights_only=True) for r in done}
    restored = len(done)
    storage = tune.get_context().get_storage()  # the trial folder on the sweep's storage
    trial_fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
    put_bytes(trial_fs, f"{trial_path}/{TRIAL_FILE}",
              json.dumps(trial_record(ctx, cfg, device)).encode())
    diverged = f"{trial_path}/{DIVERGED_FILE}"  # a diverged configuration diverges again:
    if trial_fs.get_file_info(diverged).type != FileType.NotFound:  # Tune's retry fails at once
        with trial_fs.open_input_stream(diverged) as reason:
            raise TrainingDiverged(reason.readall().decode())
    shared = shared_stage1(ctx)
    for partition in ctx.partitions[len(done):]:
        started = time.perf_counter()
        cell = cell_config(cfg, partition) if ctx.cell_seeds else cfg
        split = split_for(ctx, partition, device, cell.data)
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
        heads[partition] = result.head
        record = {"partition": partition, "stage1_key": str(models.keys),
                  "stage1_trained": models.trained, "selected_epoch": result.selected_epoch,
                  "metrics": flat_metrics(result_dict(split, cell, result, seconds)),
                  "seconds": seconds}
        done.append(record)
        record["row"] = {  # the full row: in ROWS_FILE, and in the checkpoint for a retry
            "trial_id": tune.get_context().get_trial_id(),
            "partitions_done": len(done), "partitions_total": len(ctx.partitions),
            "partition": partition,
            **record["metrics"], **running_aggregate([r["metrics"] for r in done]),
            "stage1_key": str(models.keys), "stage1_trained": record["stage1_trained"],
            "stage1_trained_total": sum(r["stage1_trained"] for r in done),
            "selected_epoch": result.selected_epoch,
            "stage1_s": seconds["stage1"], "stage1_train_s": seconds["stage1_train"],
            "stage2_s": seconds["stage2"], "scores_s": seconds["scores"],
            "node_id": node_id(),
            "restored_partitions": restored,
        }
        # (a partition restored from a checkpoint written before ROWS_FILE existed has no row
        # here: its full row is in result.json, where analysis.trials finds it)
        put_bytes(trial_fs, f"{trial_path}/{ROWS_FILE}",
                  "".join(json.dumps(r["row"]) + "\n" for r in done if "row" in r).encode())
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "partitions.json").write_text(json.dumps(done))
            for p, head in heads.items():
                torch.save(head, Path(folder) / head_file(p))
            tune.report({k: record["row"][k] for k in TUNE_KEYS},
                        checkpoint=tune.Checkpoint.from_directory(folder))
