"""Stage 1 two ways, same models, data, batch size, learning rate and epochs, in one process.

    python bench/stage1.py                                  # CPU, MNIST partition 1, 2000 images
    python bench/stage1.py --device cuda --setting synthetic_cifar10_50k --size 30000 --epochs 3

Reference-style (as the reference trains its classifier and CVAE): a Dataset with per-image
ToTensor (and, for CIFAR, per-image RandomCrop(32, padding=4) + RandomHorizontalFlip) and a
DataLoader, fp32, Adam at a constant learning rate. The engine (`cmg.stage1.train_classifier`,
`train_cvae`): uint8 data on the device, batches sliced from tensors, crop and flip as one
batched tensor op, bf16 autocast and channels-last on CUDA, no host sync inside an epoch.

Images per second = training images x epochs / seconds, for the classifier, the CVAE, and both
together (the top-level keys of the JSON on the last line).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn import functional as F

from common import parser, reference_loader, report, setup, timed
from cmg.models import build_classifier
from cmg.models.cvae import build_cvae, cvae_loss
from cmg.stage1 import train_classifier, train_cvae


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Per-image RandomCrop(32, padding=4) + RandomHorizontalFlip, as torchvision applies them."""
    from torchvision import transforms

    t = transforms.Compose([transforms.RandomCrop(32, padding=4),
                            transforms.RandomHorizontalFlip()])
    return torch.stack([t(img) for img in x])


def reference_fit(kind: str, split, cfg, device: torch.device) -> None:
    torch.manual_seed(cfg.seed)
    model = (build_classifier(split.family, split.num_classes, cfg) if kind == "classifier"
             else build_cvae(split.family, split.num_classes, cfg)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = reference_loader(split.train_x, split.train_y, cfg.batch_size, device)
    for _ in range(cfg.epochs):
        for x, y in loader:
            if kind == "classifier" and split.family == "cifar":
                x = _augment(x)  # the reference's transforms run per image, on the CPU
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if kind == "classifier":
                loss = F.cross_entropy(model(x), y)
            else:
                recon, mu, logvar = model(x, y)
                loss = cvae_loss(x, recon, mu, logvar, cfg.kl_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss.item()  # the reference logged the loss every epoch (a host sync)


def main() -> None:
    p = parser(__doc__, size=2000)
    p.add_argument("--batch-size", type=int, default=128,
                   help="both ways (the reference used 512; 128 suits a 2000-image CPU run)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's training steps (compilation happens in the "
                        "untimed warm-up and is reported as warmup_s)")
    args = p.parse_args()
    common = [f"{m}.{k}={v}" for m in ("classifier", "cvae") for k, v in (
        ("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", 1e-3),
        ("schedule", "constant") if m == "classifier" else ("kl_weight", 1.0))]
    device, cfg, split = setup(args, common + ["classifier.label_smoothing=0.0"])
    # the warm-up sees both batch shapes of the timed run (full, and the last partial one)
    n_warm = 2 * args.batch_size + len(split.train_x) % args.batch_size
    warm = replace(split, train_x=split.train_x[:n_warm], train_y=split.train_y[:n_warm])
    fits = {"classifier": train_classifier, "cvae": train_cvae}
    measured: dict = {}
    for kind, model_cfg in (("classifier", cfg.classifier), ("cvae", cfg.cvae)):
        # untimed: kernels, allocator, threads, and compilation with --compile
        reference_fit(kind, warm, replace(model_cfg, epochs=1), device)
        with timed(device, measured, f"{kind}_warmup"):
            fits[kind](warm, replace(model_cfg, epochs=1), device, quiet=True,
                       compile_model=args.compile)
    for kind, model_cfg in (("classifier", cfg.classifier), ("cvae", cfg.cvae)):
        with timed(device, measured, f"{kind}_reference"):
            reference_fit(kind, split, model_cfg, device)
        with timed(device, measured, f"{kind}_engine"):
            fits[kind](split, model_cfg, device, quiet=True, compile_model=args.compile)
    images = len(split.train_x) * args.epochs
    extra = {"setting": args.setting, "images": len(split.train_x), "epochs": args.epochs,
             "batch_size": args.batch_size, "compile": args.compile}
    for kind in ("classifier", "cvae"):
        ref, eng = measured[f"{kind}_reference_s"], measured[f"{kind}_engine_s"]
        extra.update({f"{kind}_reference_ips": round(images / ref, 1),
                      f"{kind}_engine_ips": round(images / eng, 1),
                      f"{kind}_ratio": round(ref / eng, 2),
                      f"{kind}_warmup_s": round(measured[f"{kind}_warmup_s"], 2)})
        print(f"{kind:<10}: reference-style {images / ref:9.1f} images/s, engine "
              f"{images / eng:9.1f} images/s, ratio {ref / eng:.2f}x")
    for way in ("reference", "engine"):  # both models together
        measured[f"{way}_s"] = sum(measured[f"{k}_{way}_s"] for k in ("classifier", "cvae"))
    report(images, measured, device, extra)


if __name__ == "__main__":
    main()
