"""Stage 2 two ways, same models, data and epochs, in one process: reference-style vs the engine.

    python bench/stage2.py                                  # CPU, MNIST partition 1, 2000 images
    python bench/stage2.py --device cuda --setting synthetic_cifar10_50k --size 30000

Reference-style (as the reference code runs stage 2): a Dataset with per-image ToTensor and a
DataLoader; fp32; every step runs the whole network on the IND batch and on 128 pseudo-OOD images
generated for that batch; the test set is evaluated every 20 steps (the reference's evaluation,
which also selected its reported number). The engine (`cmg.stage2.run_stage2`): IND features
computed once and cached (in a sweep once per stage-1 model, shared by every configuration),
pseudo-OOD generated once per epoch in large batches, bf16 and channels-last on CUDA, a
validation evaluation per epoch only. Both run the CMG-energy loss with margins from the stage-1
model, and report the validation AUROC of the LAST model (not a maximum over evaluations).

Images per second = IND training images x epochs / seconds. `engine` is the per-configuration
cost with features cached (what a sweep pays per configuration); `engine_first` also computes
the features. The last line is one JSON object.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch.nn import functional as F

from common import auroc, parser, reference_loader, report, setup, timed
from cmg.config import Stage2Config
from cmg.generate import generate_pseudo_ood
from cmg.metrics import cmg_score, energy_score
from cmg.stage1 import train_classifier, train_cvae
from cmg.stage2 import freeze_features, run_stage2

EVAL_EVERY = 20  # the reference's test evaluation interval (Setting 1)


@torch.no_grad()
def _scores(model, loader, device, k) -> torch.Tensor:
    return torch.cat([cmg_score(model(x.to(device)), k, "CMG-energy") for x, _ in loader])


def reference_stage2(classifier, cvae, split, cfg: Stage2Config, device, sigma: float) -> float:
    """The reference's loop, written plainly; returns the last model's validation AUROC."""
    # the reference's layout (the engine leaves the shared classifier channels-last)
    model = copy.deepcopy(classifier).float().to(device, memory_format=torch.contiguous_format)
    model.eval()
    for p in model.features.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr)
    k = split.num_classes
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    train = reference_loader(split.train_x, split.train_y, cfg.batch_size, device)
    evals = {part: [reference_loader(x, torch.zeros(len(x), dtype=torch.long), 500, device,
                                     shuffle=False) for x in (ind_x, ood_x)]
             for part in ("val", "test") for ind_x, _, ood_x in [split.eval_sets(part)]}
    with torch.no_grad():  # margins once, from the stage-1 model, as the reference sets them
        e_in = torch.cat([energy_score(model(x.to(device)), k) for x, _ in train])
        steps = math.ceil(len(split.train_x) / cfg.batch_size)
        e_gen = torch.cat([energy_score(model(generate_pseudo_ood(
            cvae, cfg.ood_per_batch, cfg, sigma, generator)), k) for _ in range(steps)])
    m_in = torch.quantile(e_in, cfg.m_in_percentile / 100)
    m_out = torch.quantile(e_gen, cfg.m_out_percentile / 100)
    step = 0
    for _ in range(cfg.epochs):
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits_in = model(x)
            x_ood = generate_pseudo_ood(cvae, cfg.ood_per_batch, cfg, sigma, generator)
            logits_out = model(x_ood)
            margin = (F.relu(energy_score(logits_in, k) - m_in).pow(2).mean()
                      + F.relu(m_out - energy_score(logits_out, k)).pow(2).mean())
            loss = F.cross_entropy(logits_in, y) + cfg.energy_weight * margin
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % EVAL_EVERY == 0:  # the reference evaluated the test set here
                auroc(*(_scores(model, loader, device, k) for loader in evals["test"]))
    return auroc(*(_scores(model, loader, device, k) for loader in evals["val"]))


def main() -> None:
    p = parser(__doc__, size=2000)
    p.add_argument("--eval-limit", type=int, default=1000, help="images per evaluation part")
    args = p.parse_args()
    device, cfg, split = setup(args, [f"data.eval_limit={args.eval_limit}",
                                      "classifier.epochs=2", "classifier.lr=3e-3",
                                      "classifier.schedule=onecycle", "classifier.batch_size=128",
                                      "cvae.epochs=2", "cvae.batch_size=128"])
    print(f"stage 1 for the benchmark ({args.setting} p{args.partition}, {len(split.train_x)} "
          f"images, untimed) ...", flush=True)
    classifier, _ = train_classifier(split, cfg.classifier, device, quiet=True)
    cvae, _ = train_cvae(split, cfg.cvae, device, quiet=True)
    s2 = replace(cfg.stage2, mode="CMG-energy", epochs=args.epochs, batch_size=128,
                 ood_per_batch=128, select="last")
    sigma = s2.sigma  # the family's default, resolved by budget_config (cmg.config)
    amp = cfg.classifier.amp  # as the pipeline passes it
    warm = replace(split, **{f: getattr(split, f)[:256] for f in (
        "train_x", "train_y", "val_ind_x", "val_ind_y", "val_ood_x", "test_ind_x", "test_ind_y",
        "test_ood_x")})
    one = replace(s2, epochs=1)  # untimed warm-up of both ways: kernels, allocator, threads
    reference_stage2(classifier, cvae, warm, one, device, sigma)
    run_stage2(classifier, cvae, warm, one, device, amp, quiet=True)
    measured: dict = {}
    with timed(device, measured, "reference"):
        auroc_reference = reference_stage2(classifier, cvae, split, s2, device, sigma)
    with timed(device, measured, "features"):
        features = freeze_features(classifier, split, amp)
    with timed(device, measured, "engine"):
        result = run_stage2(classifier, cvae, split, s2, device, amp, quiet=True,
                            features=features)
    images = len(split.train_x) * args.epochs
    first = images / (measured["engine_s"] + measured["features_s"])
    print(f"engine incl. features (first configuration of a stage-1 model): {first:.1f} images/s")
    print(f"validation AUROC of the last model: reference-style {auroc_reference:.4f}, engine "
          f"{result.val['auroc']:.4f}")
    report(images, measured, device, {
        "engine_first_ips": round(first, 1), "auroc_reference": round(auroc_reference, 4),
        "auroc_engine": round(result.val["auroc"], 4), "setting": args.setting,
        "images": len(split.train_x), "epochs": args.epochs})


if __name__ == "__main__":
    main()
