"""Class mixing: distinct classes, the mask probability, convex weights."""

import pytest
import torch

from cmg.config import Stage2Config
from cmg.generate import draw_classes, generate_pseudo_ood, mix_conditions
from cmg.models import build_cvae


def test_distinct_classes_never_repeat_and_cover_all_classes():
    classes = draw_classes(5000, 6, 2, True, torch.Generator().manual_seed(0))
    assert (classes[:, 0] != classes[:, 1]).all()
    assert torch.bincount(classes.flatten(), minlength=6).min() > 1500
    three = draw_classes(1000, 6, 3, True, torch.Generator().manual_seed(1))
    assert all(len(set(r)) == 3 for r in three.tolist())


def test_reference_mixing_repeats_about_one_in_k():
    classes = draw_classes(20000, 6, 2, False, torch.Generator().manual_seed(0))
    assert float((classes[:, 0] == classes[:, 1]).float().mean()) == pytest.approx(1 / 6, abs=0.02)


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_mask_takes_each_coordinate_from_a_mixed_class_with_the_given_probability(p):
    emb = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 32) * 10  # class c -> all 10c
    cond, classes = mix_conditions(emb, 4000, Stage2Config(mask_prob=p),
                                   torch.Generator().manual_seed(0))
    first = cond == (classes[:, :1] * 10).float()
    second = cond == (classes[:, 1:2] * 10).float()
    assert (first | second).all()
    assert float(first.float().mean()) == pytest.approx(p, abs=0.01)


def test_convex_mixing_is_a_convex_combination():
    emb = torch.eye(6)  # class c -> the c-th unit vector: a condition IS its mixing weights
    cond, classes = mix_conditions(emb, 500, Stage2Config(mixing="convex", num_mixed=3),
                                   torch.Generator().manual_seed(0))
    assert torch.allclose(cond.sum(1), torch.ones(500), atol=1e-5) and (cond >= 0).all()
    # every condition mixes its three drawn classes, each with a non-zero weight, nothing else
    assert ((cond > 0).sum(1) == 3).all()
    assert torch.equal((cond > 0).nonzero()[:, 1].view(500, 3), classes.sort(1).values)
    # Dirichlet(1, 1, 1) weights: each class's mean weight 1/3, the largest 11/18 on average
    weights = cond.gather(1, classes)
    assert weights.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.04)
    assert float(weights.amax(1).mean()) == pytest.approx(11 / 18, abs=0.03)


def test_generation_is_seeded_and_in_range():
    cvae = build_cvae("mnist", 6).eval()
    a = generate_pseudo_ood(cvae, 8, Stage2Config(), 3.0, torch.Generator().manual_seed(4))
    b = generate_pseudo_ood(cvae, 8, Stage2Config(), 3.0, torch.Generator().manual_seed(4))
    assert a.shape == (8, 1, 28, 28) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
