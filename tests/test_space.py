"""The search space without Ray: define-by-run draws, the first point, overrides and space files
(real Optuna in-memory studies; milliseconds)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from cmg.config import MODES, apply_overrides, budget_config
from cmg.errors import UsageError
from conftest import assert_refused
from tune.space import (check_fixed, default_space, first_point, load_space_file, mode_choices,
                        suggest, to_overrides)

optuna.logging.set_verbosity(optuna.logging.WARNING)
ENERGY_ONLY = {"energy_weight", "m_in_percentile", "m_out_percentile"}


def space_from(tmp_path: Path, text: str) -> dict:
    """The quick budget's default space with a space file of `text` applied."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space_file(path, default_space(budget_config("quick")))


def draw(space, modes, n=40, seed=0) -> list[dict]:
    """The parameters (drawn and fixed) of n trials of a seeded Optuna study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        fixed = suggest(trial, space, modes)
        out.append({**trial.params, **fixed})
        study.tell(trial, 0.5)
    return out


def test_conditional_knobs_are_drawn_only_when_they_matter():
    space = default_space(budget_config("quick"))
    for params in draw(space, ("CMG-softmax",)):
        assert params["mode"] == "CMG-softmax" and not ENERGY_ONLY & set(params)
        assert ("mask_prob" in params) == (params["mixing"] == "mask")
    energy = draw(space, ("CMG-energy",))
    assert all(ENERGY_ONLY <= set(p) for p in energy)
    both = draw(space, MODES)
    assert {p["mode"] for p in both} == set(MODES)  # drawn, not fixed
    for p in both:
        assert (ENERGY_ONLY <= set(p)) == (p["mode"] == "CMG-energy")


def test_draws_stay_inside_their_ranges_and_fixed_values_are_returned(tmp_path):
    space = space_from(tmp_path, "sigma: {low: 1.0, high: 2.0}\nnum_mixed: 3\n"
                                      "ood_per_batch: {choices: [32]}\n")
    for p in draw(space, ("CMG-energy",)):
        assert 1.0 <= p["sigma"] <= 2.0 and p["num_mixed"] == 3 and p["ood_per_batch"] == 32
        assert 1e-6 <= p["lr"] <= 1e-3 and isinstance(p["epochs"], int)


def test_first_point_is_the_reference_defaults():
    base = budget_config("quick")
    space = default_space(base)
    point = first_point(space, base, modes=("CMG-energy",))
    assert point == {"mixing": "mask", "mask_prob": 0.5, "num_mixed": 2, "distinct": True,
                     "sigma": 3.0, "energy_weight": 0.1, "m_in_percentile": 20.0,
                     "m_out_percentile": 80.0, "lr": 1e-4, "epochs": base.stage2.epochs,
                     "ood_per_batch": 128, "latent_dim": 32}
    # sigma comes from the config: budget_config resolved the family's default
    cifar = budget_config("quick", "cifar")
    softmax = first_point(space, cifar, modes=("CMG-softmax", "CMG-energy"))
    assert softmax["mode"] == "CMG-softmax" and not ENERGY_ONLY & set(softmax)
    assert softmax["sigma"] == 5.0


def test_first_point_leaves_excluded_and_fixed_values_to_the_space(tmp_path):
    base = budget_config("quick")
    space = space_from(tmp_path, "sigma: {low: 4.0, high: 8.0}\nlatent_dim: 16\n")
    point = first_point(space, base, modes=("CMG-energy",))
    assert "sigma" not in point and "latent_dim" not in point and point["lr"] == 1e-4


def test_overrides_map_every_parameter_to_its_config_key():
    base = budget_config("quick")
    space = default_space(base)
    params = {"mode": "CMG-softmax", "sigma": 2.5, "latent_dim": 16, "mixing": "convex",
              "epochs": 4}
    overrides = to_overrides(params, space)
    assert overrides == {"stage2.mode": "CMG-softmax", "stage2.sigma": 2.5,
                         "cvae.latent_dim": 16, "stage2.mixing": "convex", "stage2.epochs": 4}
    cfg = apply_overrides(base, overrides)
    assert (cfg.stage2.sigma, cfg.cvae.latent_dim, cfg.stage2.mode) == (2.5, 16, "CMG-softmax")


def test_epoch_range_scales_with_the_budget():
    assert (default_space(budget_config("quick"))["epochs"].low,
            default_space(budget_config("quick"))["epochs"].high) == (1, 6)
    paper = default_space(budget_config("paper"))["epochs"]
    assert (paper.low, paper.high) == (5, 30)


@pytest.mark.parametrize("text, words", [
    ("sigmaa: 3\n", ["unknown parameter 'sigmaa'"]),
    ("sigma: {low: 4, high: 1}\n", ["'sigma'", "low <= high"]),
    ("sigma: {low: 0, high: 1, log: true}\n", ["low > 0"]),
    ("mixing: {low: 0, high: 1}\n", ["'mixing'", "{choices: [..]}"]),
    ("sigma: [1, 2\n", ["not valid YAML", "line"]),
    ("- sigma\n", ["must map parameter names"]),
])
def test_bad_space_files_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_space_file(path, default_space(budget_config("quick")))
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_unknown_mode_is_a_usage_error():
    assert mode_choices("both") == MODES
    with pytest.raises(UsageError, match="unknown mode"):
        mode_choices("CMG")




@pytest.mark.parametrize("text, words", [
    ("num_mixed: 0\n", ["'num_mixed: 0'", "at least 1"]),
    ("sigma: -1.0\n", ["'sigma: -1.0'", "positive"]),
    ("mask_prob: 1.5\n", ["'mask_prob: 1.5'", "[0, 1]"]),
    ("num_mixed: two\n", ["'num_mixed: two'"]),
])
def test_fixed_values_that_no_trial_could_run_are_refused_before_the_sweep(tmp_path, text,
                                                                           words):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    base = budget_config("quick")
    space = load_space_file(path, default_space(base))  # loads: only the config knows the rule
    with pytest.raises(UsageError) as err:
        check_fixed(path, space, base)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_valid_fixed_values_pass_and_the_sweep_command_refuses_a_bad_one(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("num_mixed: 1\nsigma: 2.5\n")  # one class per condition is a valid control
    base = budget_config("quick")
    check_fixed(path, load_space_file(path, default_space(base)), base)
    path.write_text("num_mixed: 0\n")
    assert_refused(tmp_path / "sweeps", "--space", str(path), words=["num_mixed", "at least 1"])
