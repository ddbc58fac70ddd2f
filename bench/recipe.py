"""Time to quality of stage 1: the reference's classifier recipe against short one-cycle recipes.

    python bench/recipe.py --device cuda                      # real MNIST partition 1, all images
    python bench/recipe.py --size 2000 --reference-epochs 4 --fast 1 2   # a CPU dry run (~2 min)

The reference recipe is the classifier's defaults (`ClassifierConfig()`: Adam at a constant
1e-3, batch 512, 100 epochs). A fast recipe trains the same network on the same images with the
same engine for fewer epochs, with a one-cycle schedule, a larger peak learning rate and label
smoothing. Both are timed (training only; the device is synchronised around it) and scored by
IND accuracy on the partition's test images. A fast recipe "holds" when its accuracy is within
`--tolerance` (0.5 points) of the reference's in at most 1/10 of its time. The reference's
accuracy every `--curve-every` epochs is printed as well (evaluation time not counted), so the
epoch at which it got within the tolerance of its final value can be read off.

The last line is one JSON object: `reference` and each of `fast` ({epochs, lr, seconds,
test_acc, time_ratio, holds}), `device`, `images`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import parser, setup
from cmg.checkpoint import load_checkpoint
from cmg.config import ClassifierConfig
from cmg.models import build_classifier, ind_logits
from cmg.precision import prepare
from cmg.stage1 import train_classifier
from cmg.stage2 import extract_features


@torch.no_grad()
def ind_test_accuracy(model, split) -> float:
    feats = extract_features(model, split.test_ind_x)
    logits = ind_logits(model.head(feats), split.num_classes)
    return (logits.argmax(1) == split.test_ind_y).float().mean().item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_timed(split, cfg: ClassifierConfig, device, workdir: Path, curve_every: int = 0):
    """Train with a checkpoint per epoch, as the pipeline does; return (model, training seconds,
    [(epoch, test accuracy)] every `curve_every` epochs, read back from the checkpoint)."""
    checkpoint = Path(tempfile.mkdtemp(dir=workdir)) / "classifier.pt"  # a fresh one per recipe
    curve: list[tuple[int, float]] = []
    excluded = 0.0  # seconds spent evaluating inside the callback, not training

    def callback(epoch: int, _metrics) -> None:
        nonlocal excluded
        if curve_every and (epoch % curve_every == 0 or epoch == cfg.epochs):
            start = time.perf_counter()
            model = build_classifier(split.family, split.num_classes, cfg)
            model.load_state_dict(load_checkpoint(checkpoint, "classifier")["model"])
            curve.append((epoch, ind_test_accuracy(prepare(model, device).eval(), split)))
            excluded += time.perf_counter() - start

    sync(device)
    start = time.perf_counter()
    model, _ = train_classifier(split, cfg, device, checkpoint, callback, quiet=True)
    sync(device)
    return model, time.perf_counter() - start - excluded, curve


def main() -> None:
    p = parser(__doc__, size=0, epochs=False)
    p.add_argument("--reference-epochs", type=int, default=ClassifierConfig().epochs,
                   help="the reference recipe's epochs (constant learning rate 1e-3)")
    p.add_argument("--fast", type=int, nargs="+", default=[4, 6, 8, 10],
                   help="epochs of each fast recipe to try")
    p.add_argument("--fast-lr", type=float, default=3e-3, help="one-cycle peak learning rate")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the fast recipes")
    p.add_argument("--batch-size", type=int, default=ClassifierConfig().batch_size,
                   help="the reference recipe's batch size")
    p.add_argument("--fast-batch-size", type=int, default=None,
                   help="the fast recipes' batch size (default: --batch-size)")
    p.add_argument("--curve-every", type=int, default=10,
                   help="evaluate the reference every N epochs (0: only at the end)")
    p.add_argument("--tolerance", type=float, default=0.005, help="accuracy, as a fraction")
    args = p.parse_args()
    # --size 0 (the default): every training image of the partition; all IND test images
    device, _, split = setup(args, [f"data.train_limit={args.size or 'null'}",
                                    "data.eval_limit=null"])
    print(f"{split.setting} p{split.partition}: {len(split.train_x)} training images, "
          f"{len(split.test_ind_x)} IND test images, device {device}")
    base = ClassifierConfig(batch_size=args.batch_size)
    # untimed warm-up: kernels, allocator, autotuning
    warm = replace(split, train_x=split.train_x[:4 * args.batch_size],
                   train_y=split.train_y[:4 * args.batch_size])
    train_classifier(warm, replace(base, epochs=1), device, quiet=True)
    with tempfile.TemporaryDirectory(prefix="cmg-recipe-") as tmp:
        reference, fast = compare(split, base, args, device, Path(tmp))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "images": len(split.train_x), "reference": reference,
                      "fast": fast}))


def compare(split, base: ClassifierConfig, args, device, work: Path) -> tuple[dict, list[dict]]:
    ref_cfg = replace(base, epochs=args.reference_epochs)
    model, seconds, curve = train_timed(split, ref_cfg, device, work, args.curve_every)
    ref_acc = curve[-1][1] if curve else ind_test_accuracy(model, split)
    reference = {"epochs": ref_cfg.epochs, "lr": ref_cfg.lr, "seconds": round(seconds, 2),
                 "test_acc": round(ref_acc, 4), "curve": [[e, round(a, 4)] for e, a in curve]}
    print(f"reference: {ref_cfg.epochs} epochs, constant lr {ref_cfg.lr}: "
          f"test accuracy {ref_acc:.4f} in {seconds:.2f} s")
    for epoch, acc in curve:
        print(f"  epoch {epoch:4d}: {acc:.4f}")
    fast = []
    for epochs in args.fast:
        cfg = replace(base, epochs=epochs, lr=args.fast_lr, schedule="onecycle",
                      label_smoothing=args.label_smoothing,
                      batch_size=args.fast_batch_size or base.batch_size)
        model, seconds, _ = train_timed(split, cfg, device, work)
        acc = ind_test_accuracy(model, split)
        ratio = seconds / reference["seconds"]
        holds = acc >= ref_acc - args.tolerance and ratio <= 0.1
        fast.append({"epochs": epochs, "lr": args.fast_lr, "batch_size": cfg.batch_size,
                     "seconds": round(seconds, 2),
                     "test_acc": round(acc, 4), "time_ratio": round(ratio, 4), "holds": holds})
        print(f"fast: {epochs} epochs, batch {cfg.batch_size}, one-cycle lr {args.fast_lr}, "
              f"label smoothing "
              f"{args.label_smoothing}: test accuracy {acc:.4f} in {seconds:.2f} s "
              f"({ratio:.3f} of the reference's time){'  HOLDS' if holds else ''}")
    return reference, fast


if __name__ == "__main__":
    main()
