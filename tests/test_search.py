"""The sweep's TPE sampler: its options chosen by the project (not the installed Optuna's
defaults), seeded, and drawing only the active knobs of the conditional space."""

from __future__ import annotations

import functools

import optuna

from cmg.config import budget_config
from tune.search import SweepSearcher
from tune.space import default_space, mode_choices, suggest

ENERGY_KNOBS = {"energy_weight", "m_in_percentile", "m_out_percentile"}  # only for CMG-energy
SPACE = functools.partial(suggest, space=default_space(budget_config("smoke")),
                          modes=mode_choices("both"))


def _searcher(seed: int, name: str, storage) -> SweepSearcher:
    return SweepSearcher(space=SPACE, metric="val_auroc_mean", mode="max", seed=seed,
                         study_name=name, storage=storage)


def _drive(searcher: SweepSearcher, trials: int) -> list[dict]:
    """Ask and tell `trials` in turn, the objective a fixed function of the parameters."""
    drawn = []
    for i in range(trials):
        params = searcher.suggest(f"t{i}")
        value = sum(v for v in params.values() if isinstance(v, (int, float))) % 1.0
        searcher.on_trial_complete(f"t{i}", {"val_auroc_mean": value, "partitions_done": 5,
                                             "partitions_total": 5})
        drawn.append(params)
    return drawn


def test_the_sampler_is_seeded_tpe_with_constant_liar_multivariate_and_groups():
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(7, "a", storage)
    sampler = searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # set by the project: Optuna 4 defaults to neither liar nor multivariate
    assert (sampler._constant_liar, sampler._multivariate, sampler._group) == (True, True, True)
    # past TPE's 10 random start-up trials, the same seed draws the same configurations
    first = _drive(searcher, 14)
    assert _drive(_searcher(7, "b", storage), 14) == first
    assert _drive(_searcher(8, "c", storage), 14) != first
    # grouped TPE on the conditional space: each trial holds its mode's knobs and no others
    assert {p["mode"] for p in first} == {"CMG-energy", "CMG-softmax"}
    for params in first:
        energy = ENERGY_KNOBS & set(params)
        assert energy == (ENERGY_KNOBS if params["mode"] == "CMG-energy" else set())
        assert ("mask_prob" in params) == (params["mixing"] == "mask")
