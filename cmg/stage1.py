"""Stage 1: train the IND classifier and the CVAE on the IND training images.

Both share one loop (`_fit`): uint8 images already on the device, batches sliced by index, no
DataLoader; bf16 autocast and channels-last on CUDA; Adam with an optional one-cycle schedule; a
checkpoint after every epoch (model, optimizer, schedule, epoch, RNG states) that a later call
with the same config resumes from; a per-epoch callback (Ray Tune reports through it).

    model, history = train_classifier(split, ClassifierConfig(epochs=2), device="cuda",
                                      checkpoint="ckpt/clf.pt", callback=print)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F

from cmg.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from cmg.config import ClassifierConfig, CVAEConfig, DataConfig, RunConfig
from cmg.data import Split, batches, random_crop_flip, to_float
from cmg.errors import fail
from cmg.models import CVAE, Classifier, build_classifier, build_cvae, cvae_loss, ind_logits
from cmg.precision import autocast, maybe_compile, prepare
from cmg.progress import Progress

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the model, epoch and config."""


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_identity(kind: str, data: DataConfig) -> dict[str, Any]:
    """The data config a stage-1 model depends on: which images it trained on (split seed,
    validation share, train limit) and, for the classifier, augmentation. A model must never
    be reused for a split whose validation images it may have trained on."""
    keep = ("split_seed", "val_fraction", "train_limit") + (("augment",) if kind == "classifier"
                                                            else ())
    return {name: getattr(data, name) for name in keep}


def _identity(kind: str, split: Split, cfg) -> dict[str, Any]:
    """What a checkpoint must match to be resumed or used: model kind, data and config."""
    return {"kind": kind, "setting": split.setting, "partition": split.partition,
            "family": split.family, "num_classes": split.num_classes,
            "data": data_identity(kind, split.data), "config": dataclasses.asdict(cfg)}


def _fit(kind: str, model: torch.nn.Module, split: Split, cfg, device: torch.device,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
         checkpoint: str | os.PathLike | None, callback: EpochCallback | None,
         quiet: bool) -> list[dict[str, float]]:
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                 weight_decay=getattr(cfg, "weight_decay", 0.0))
    n = len(split.train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch))
        if cfg.schedule == "onecycle" else None)
    identity = _identity(kind, split, cfg)
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, kind)
        if {k: state.get(k) for k in identity} != identity:
            fail(f"checkpoint {checkpoint} was trained with another setting, partition or "
                 "config; delete it or choose another path")
        load_state_dict_strict(model, state["model"], checkpoint)
        start, history = state["epoch"], list(state["history"])
        if start < cfg.epochs:  # a finished training's checkpoint has the weights alone
            optimizer.load_state_dict(state["optimizer"])
            if schedule is not None:
                schedule.load_state_dict(state["schedule"])
            _restore_rng(state["rng"], generator)

    bar = Progress(f"{kind} {split.setting} p{split.partition}",
                   (cfg.epochs - start) * steps_per_epoch, quiet)
    for epoch in range(start, cfg.epochs):
        model.train()
        sums: dict[str, torch.Tensor] = {}
        for step, idx in enumerate(batches(n, cfg.batch_size, generator, device)):
            with autocast(device, cfg.amp):
                loss, stats = loss_fn(split.train_x[idx], split.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            for k, v in stats.items():  # device tensors: no host sync inside the epoch
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(idx)
            if bar.due():
                bar.update((epoch - start) * steps_per_epoch + step + 1,
                           epoch=f"{epoch + 1}/{cfg.epochs}", loss=float(loss.detach()))
        metrics = {"epoch": epoch + 1, **{k: float(v) / n for k, v in sums.items()}}
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(f"{kind} loss became {metrics['loss']} in epoch {epoch + 1} "
                                   f"(lr={cfg.lr}); lower the learning rate")
        history.append(metrics)
        if checkpoint is not None:
            # what resumes the training, until it is done: then the weights alone (Adam's
            # moments are twice their size, and a stage-1 store publishes this file)
            resume = {} if epoch + 1 == cfg.epochs else {
                "optimizer": optimizer.state_dict(), "rng": _rng_state(generator),
                "schedule": schedule.state_dict() if schedule else {}}
            save_checkpoint(checkpoint, {**identity, "model": model.state_dict(),
                                         "epoch": epoch + 1, "history": history, **resume})
        if callback is not None:
            callback(epoch + 1, metrics)
    bar.close(**{k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"})
    model.eval()
    return history


def ind_smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, num_classes: int,
                               smoothing: float) -> torch.Tensor:
    """Cross-entropy over all K + 1 outputs against the label smoothed over the K IND classes
    only: target (1 - smoothing) on y plus smoothing / K on each IND class, never on the OOD
    slot (F.cross_entropy's label_smoothing would put smoothing / (K + 1) there and teach the
    classifier that every IND image is a little OOD)."""
    log_p = F.log_softmax(logits, dim=1)
    nll = F.nll_loss(log_p, y)
    if not smoothing:
        return nll
    return (1 - smoothing) * nll - smoothing * ind_logits(log_p, num_classes).mean(dim=1).mean()


def train_classifier(split: Split, cfg: ClassifierConfig = ClassifierConfig(),
                     device: str | torch.device = "cpu",
                     checkpoint: str | os.PathLike | None = None,
                     callback: EpochCallback | None = None, quiet: bool = False,
                     compile_model: bool = False) -> tuple[Classifier, list[dict[str, float]]]:
    """Train (or resume) the IND classifier with cross-entropy over its K + 1 outputs."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)  # before building: the initial weights are part of the seed
    model = prepare(build_classifier(split.family, split.num_classes, cfg), device)
    net = maybe_compile(model, compile_model)
    augment = split.family == "cifar" and split.data.augment
    channels_last = device.type == "cuda"

    def loss_fn(x, y):
        x = to_float(x)
        if augment:
            x = random_crop_flip(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = net(x)
        loss = ind_smoothed_cross_entropy(logits.float(), y, split.num_classes,
                                          cfg.label_smoothing)
        acc = (ind_logits(logits, split.num_classes).argmax(1) == y).float().mean()
        return loss, {"loss": loss, "acc": acc}

    history = _fit("classifier", model, split, cfg, device, loss_fn, checkpoint, callback, quiet)
    return model, history


def train_cvae(split: Split, cfg: CVAEConfig = CVAEConfig(), device: str | torch.device = "cpu",
               checkpoint: str | os.PathLike | None = None, callback: EpochCallback | None = None,
               quiet: bool = False,
               compile_model: bool = False) -> tuple[CVAE, list[dict[str, float]]]:
    """Train (or resume) the CVAE: per-pixel MSE + kl_weight * KL, no augmentation."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = prepare(build_cvae(split.family, split.num_classes, cfg), device)
    net = maybe_compile(model, compile_model)

    def loss_fn(x, y):
        x = to_float(x)
        recon, mu, logvar = net(x, y)
        loss = cvae_loss(x, recon, mu, logvar, cfg.kl_weight)
        return loss, {"loss": loss}

    history = _fit("cvae", model, split, cfg, device, loss_fn, checkpoint, callback, quiet)
    return model, history


def train_model(kind: str, split: Split, cfg: RunConfig, device: str | torch.device = "cpu",
                checkpoint: str | os.PathLike | None = None,
                callback: EpochCallback | None = None, quiet: bool = False,
                compile_model: bool = False) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train (or resume) one stage-1 model, "classifier" or "cvae", with its section of `cfg`.

        cvae, history = train_model("cvae", split, cfg, "cuda", checkpoint="ckpt/cvae.pt")"""
    train = {"classifier": train_classifier, "cvae": train_cvae}[kind]
    return train(split, getattr(cfg, kind), device, checkpoint, callback, quiet=quiet,
                 compile_model=compile_model)


@dataclasses.dataclass
class Stage1Result:
    """A partition's stage-1 models, their per-epoch histories and training seconds (no
    "classifier" history or seconds when a frozen backbone took the classifier's place)."""

    classifier: torch.nn.Module
    cvae: CVAE
    histories: dict[str, list[dict[str, float]]]
    seconds: dict[str, float]


def train_stage1(split: Split, cfg: RunConfig, device: str | torch.device = "cpu",
                 backbone: torch.nn.Module | None = None,
                 checkpoint: Callable[[str], str | os.PathLike | None] = lambda kind: None,
                 callback: Callable[[str], EpochCallback | None] = lambda kind: None,
                 quiet: bool = False, compile_model: bool = False) -> Stage1Result:
    """Stage 1 of one partition: the IND classifier (or `backbone`, a loaded frozen network, in
    its place: then only the CVAE trains), then the CVAE. `checkpoint(kind)` and
    `callback(kind)` give each model's checkpoint path and per-epoch callback ("classifier" or
    "cvae"); with a checkpoint a training resumes from it.

        result = train_stage1(split, cfg, "cuda", checkpoint=lambda kind: f"ckpt/{kind}.pt")
        result.classifier, result.cvae, result.seconds["cvae"]"""
    histories, seconds, models = {}, {}, {"classifier": backbone}
    for kind in ("classifier", "cvae") if backbone is None else ("cvae",):
        started = time.perf_counter()
        models[kind], histories[kind] = train_model(kind, split, cfg, device, checkpoint(kind),
                                                    callback(kind), quiet, compile_model)
        seconds[kind] = time.perf_counter() - started
    return Stage1Result(models["classifier"], models["cvae"], histories, seconds)


def check_trained_for(state: dict[str, Any], path: str | os.PathLike, setting: str,
                      partition: int, data: DataConfig, require_data: bool = True) -> None:
    """One-line error unless the checkpoint `state` was trained for this setting, partition and
    data split (a checkpoint without a recorded data split is refused too)."""
    if (state.get("setting"), state.get("partition")) != (setting, partition):
        fail(f"checkpoint {path} was trained on {state.get('setting')} partition "
             f"{state.get('partition')}, not {setting} partition {partition}")
    want = data_identity(state["kind"], data)
    if state.get("data") != want and (require_data or "data" in state):
        fail(f"checkpoint {path} was trained on another data split ({state.get('data')}, "
             f"this run: {want}); train it again for this split")


def load_stage1_model(path: str | os.PathLike, kind: str, split: Split | None = None,
                      device: str | torch.device = "cpu",
                      trained_for: tuple[str, int, DataConfig] | None = None,
                      require_data: bool = True) -> torch.nn.Module:
    """Rebuild a trained classifier or CVAE from its checkpoint, checked against `split` (or
    `trained_for`: setting, partition, data config). `require_data=False` accepts a checkpoint
    that records no data split (an artifact store's, whose key holds the data config)."""
    state = load_checkpoint(path, kind)
    if split is not None:
        trained_for = (split.setting, split.partition, split.data)
    if trained_for is not None:
        check_trained_for(state, path, *trained_for, require_data=require_data)
    if state["epoch"] < state["config"]["epochs"]:
        fail(f"checkpoint {path} stopped at epoch {state['epoch']} of "
             f"{state['config']['epochs']}; run the same training command again to finish it")
    if kind == "classifier":
        model = build_classifier(state["family"], state["num_classes"],
                                 ClassifierConfig(**state["config"]))
    else:
        model = build_cvae(state["family"], state["num_classes"], CVAEConfig(**state["config"]))
    load_state_dict_strict(model, state["model"], path)
    return prepare(model, torch.device(device)).eval()
