"""Selected configurations on the edge of the searched range (analysis.edges): flagged within 5% of
a range (log space for log knobs), silent inside it, and the --space line that widens it read
back by the sweep's own space-file reader. Milliseconds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from analysis.edges import EDGE, LIMITS, edges
from cmg.config import apply_overrides, budget_config
from cmg.errors import UsageError
from cmg.generate import mix_conditions
from tune.space import default_space, load_space_file


# the ranges of the first headline's sweeps (the default space then), where its optima sat on
# bounds; the default space now reaches past them
FIRST_HEADLINE = ("lr: {low: 1.0e-5, high: 1.0e-3, log: true}\nmask_prob: {low: 0.1, high: 0.9}\n"
                  "sigma: {low: 0.5, high: 8.0, log: true}\n"
                  "energy_weight: {low: 0.01, high: 1.0, log: true}\n")


def first_headline_space(tmp_path) -> dict:
    """The quick budget's space of the first headline, as manifest.json records it
    (tune.spec.SweepSpec)."""
    path = tmp_path / "first.yaml"
    path.write_text(FIRST_HEADLINE)
    return as_manifest(load_space_file(path, default_space(budget_config("quick"))))


def as_manifest(space) -> dict:
    return {name: dataclasses.asdict(p) for name, p in space.items()}


@pytest.fixture
def manifest_space(tmp_path) -> dict:
    return first_headline_space(tmp_path)


# inside every range by more than 5%: lr at 1e-4 is half-way in log space between 1e-5 and 1e-3
INSIDE = {"mixing": "mask", "mask_prob": 0.5, "num_mixed": 3, "distinct": True, "sigma": 2.0,
          "energy_weight": 0.1, "m_in_percentile": 20.0, "m_out_percentile": 80.0, "lr": 1e-4,
          "epochs": 3, "ood_per_batch": 128, "latent_dim": 32}


def test_a_configuration_inside_every_range_is_silent(manifest_space):
    assert edges(INSIDE, manifest_space) == []


def test_knobs_on_a_bound_are_flagged_with_the_line_that_widens_them(tmp_path, manifest_space):
    # the README's headline optimum (selected on unseen digits): lr 1.16e-5 is 3% of the two
    # decades above 1e-5; mask_prob 0.895 is 99% of [0.1, 0.9]; sigma 0.64 is 9% of [0.5, 8] in
    # log space (log 1.28 / log 16), so it is not flagged
    found = edges({**INSIDE, "lr": 1.1552e-5, "mask_prob": 0.895, "sigma": 0.6364},
                  manifest_space)
    assert [(e.name, e.side) for e in found] == [("mask_prob", "high"), ("lr", "low")]
    mask, lr = found
    assert lr.position == pytest.approx(math.log10(1.1552) / 2)
    assert mask.position == pytest.approx(0.795 / 0.8)
    # lr: half the decades again below (1e-6); mask_prob: half its width above, clipped to 1,
    # where every coordinate comes from one class
    assert lr.space_line() == "lr: {low: 1.0e-06, high: 0.001, log: true}"
    assert mask.space_line() == "mask_prob: {low: 0.1, high: 1.0}"
    assert "`lr` 1.16e-05 sits at the low end of [1e-05, 0.001]" in lr.line()
    assert lr.space_line() in lr.line()
    # the lines are what the sweep's --space reader takes
    path = tmp_path / "wider.yaml"
    path.write_text("\n".join(e.space_line() for e in found) + "\n")
    first = load_space_file(tmp_path / "first.yaml", default_space(budget_config("quick")))
    space = load_space_file(path, first)
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-6, 1e-3, True)
    assert (space["mask_prob"].low, space["mask_prob"].high) == (0.1, 1.0)
    assert edges({**INSIDE, "lr": 1.1552e-5, "mask_prob": 0.895},
                 as_manifest(space)) == []


def test_the_default_space_holds_the_first_headlines_optima_inside():
    # where the first headline's optima sat on a bound (lr, mask_prob; energy_weight 0.0132 and
    # sigma 0.64 near one), the default space now reaches past them
    optima = {**INSIDE, "lr": 1.1552e-5, "mask_prob": 0.895, "sigma": 0.6364,
              "energy_weight": 0.0132}
    assert edges(optima, as_manifest(default_space(budget_config("quick")))) == []


def test_the_edge_is_five_percent_of_the_range_from_either_bound(manifest_space):
    space = manifest_space  # sigma: [0.5, 8], log; epochs: [1, 6]
    just_in, just_out = 0.5 * 16 ** (EDGE * 0.99), 0.5 * 16 ** (EDGE * 1.01)
    assert [e.name for e in edges({**INSIDE, "sigma": just_in}, space)] == ["sigma"]
    assert edges({**INSIDE, "sigma": just_out}, space) == []
    assert [(e.name, e.side) for e in edges({**INSIDE, "epochs": 6}, space)] == [("epochs", "high")]
    assert edges({**INSIDE, "epochs": 5}, space) == []  # 80% of [1, 6]
    # an integer knob widens by whole steps: [1, 6] -> [1, 9]
    assert edges({**INSIDE, "epochs": 6}, space)[0].space_line() == "epochs: {low: 1, high: 9}"


def test_fixed_categorical_and_undrawn_knobs_are_never_flagged(manifest_space):
    space = manifest_space
    space["lr"] = {**space["lr"], "fixed": 1e-5}  # fixed by a space file: not searched
    params = {**INSIDE, "lr": 1e-5, "ood_per_batch": 256, "latent_dim": 64,
              "mask_prob": float("nan"), "energy_weight": None}  # not drawn (convex, softmax)
    del params["sigma"]
    assert edges(params, space) == []
    assert edges(INSIDE, None) == []  # no manifest: nothing to compare with


def test_a_bound_at_the_knobs_hard_limit_cannot_widen(manifest_space):
    space = manifest_space
    space["mask_prob"] = {**space["mask_prob"], "low": 0.5, "high": 1.0}
    (edge,) = edges({**INSIDE, "mask_prob": 0.99}, space)
    assert edge.space_line() is None and "hard limit" in edge.line()


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_the_hard_limits_are_the_configs_own(key):
    """Each LIMITS bound is a value cmg.config accepts, and (for the knobs it checks) the next
    value out is one it refuses: the widened ranges never make a sweep fail."""
    low, high = LIMITS[key]
    base = budget_config("quick")
    for bound in (b for b in (low, high) if b is not None):
        apply_overrides(base, {key: bound})
    checked = {"stage2.mask_prob", "stage2.m_in_percentile", "stage2.m_out_percentile"}
    if key in checked:
        with pytest.raises(UsageError):
            apply_overrides(base, {key: low - 1 if isinstance(low, int) else low - 1e-9})
        if high is not None:
            with pytest.raises(UsageError):
                apply_overrides(base, {key: high + 1e-9})


def test_two_mixed_classes_is_the_floor_one_is_no_mix():
    """num_mixed 2 at the low end of [2, 5] (both headline sweeps' CMG optima) is flagged, but the
    range does not widen to 1: a condition drawn from one class is that class's embedding,
    mixed with nothing (the single-class arm's pseudo-OOD), whatever the mixing knobs say."""
    space = as_manifest(default_space(budget_config("quick")))
    (edge,) = edges({**INSIDE, "num_mixed": 2}, space)
    assert (edge.name, edge.side, edge.position) == ("num_mixed", "low", 0.0)
    assert edge.space_line() is None and "hard limit" in edge.line()
    embeddings = torch.randn(10, 6)
    for mixing in ("mask", "convex"):
        cfg = dataclasses.replace(budget_config("quick").stage2, mixing=mixing, num_mixed=1,
                                  mask_prob=0.3)
        cond, classes = mix_conditions(embeddings, 64, cfg, torch.Generator().manual_seed(0))
        assert torch.allclose(cond, embeddings[classes[:, 0]])
