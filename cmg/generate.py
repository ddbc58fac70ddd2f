"""Class-mixed generation: decode pseudo-OOD images from conditions that mix IND classes.

For each sample, `num_mixed` IND classes are drawn (distinct by default; the reference allowed
repeats, so 1/K of its "pseudo-OOD" were single-class). Their class embeddings are combined
either per coordinate ("mask": coordinate d comes from the first class with probability
`mask_prob`, else uniformly from the others; with two classes and 0.5 this is the reference's
fair coin) or convexly ("convex": Dirichlet(1) weights, the paper's k*y_i + (1-k)*y_j).
z ~ N(0, sigma^2 I), with sigma larger than the N(0, I) prior, pushes samples off the data.

    images = generate_pseudo_ood(cvae, 512, cfg, sigma=3.0, generator=g)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cmg.config import Stage2Config
from cmg.models import CVAE


def draw_classes(n: int, num_classes: int, num_mixed: int, distinct: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """(n, num_mixed) class ids; rows without repeats when `distinct` (and num_mixed <= K)."""
    dev = generator.device
    if distinct and num_mixed <= num_classes:
        return torch.rand(n, num_classes, generator=generator, device=dev).argsort(dim=1)[:, :num_mixed]
    return torch.randint(0, num_classes, (n, num_mixed), generator=generator, device=dev)


def mix_conditions(embeddings: torch.Tensor, n: int, cfg: Stage2Config,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed conditions (n, embed_dim) from class embeddings (K, embed_dim), and the classes used."""
    k, d = embeddings.shape
    m = cfg.num_mixed
    classes = draw_classes(n, k, m, cfg.distinct, generator)
    chosen = embeddings[classes]  # (n, m, d)
    dev = generator.device
    if cfg.mixing == "convex":
        weights = -torch.log(torch.rand(n, m, generator=generator, device=dev).clamp_min(1e-12))
        weights = weights / weights.sum(dim=1, keepdim=True)  # Dirichlet(1, ..., 1)
        return (weights[:, :, None] * chosen).sum(dim=1), classes
    if m == 1:
        return chosen[:, 0], classes
    probs = torch.full((m,), (1 - cfg.mask_prob) / (m - 1), device=dev)
    probs[0] = cfg.mask_prob
    pick = torch.multinomial(probs, n * d, replacement=True, generator=generator).view(n, 1, d)
    return chosen.gather(1, pick).squeeze(1), classes


@torch.no_grad()
def generate_pseudo_ood(cvae: CVAE, n: int, cfg: Stage2Config, sigma: float,
                        generator: torch.Generator) -> torch.Tensor:
    """n pseudo-OOD images in [0, 1] on the generator's device: decoded from class-mixed
    conditions (`cfg.pseudo_ood` "mixed", CMG), from single-class ones ("single": one class per
    condition, the same sigma: the control without mixing), or uniform noise ("noise")."""
    if cfg.pseudo_ood == "noise":
        return torch.rand(n, *cvae.image_shape, generator=generator, device=generator.device)
    if cfg.pseudo_ood == "single":
        cfg = replace(cfg, num_mixed=1)
    cond, _ = mix_conditions(cvae.class_embeddings(), n, cfg, generator)
    z = torch.randn(n, cvae.latent_dim, generator=generator, device=generator.device) * sigma
    return cvae.decode(z, cond.to(z.dtype))
