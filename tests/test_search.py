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


def _finished_study(values: list[float], running: int = 0) -> optuna.Study:
    """A maximising study of one float knob: a COMPLETE trial per value (x = value), then
    `running` trials asked and not told."""
    study = optuna.create_study(direction="maximize")
    knob = optuna.distributions.FloatDistribution(0.0, 1.0)
    for value in values:
        study.add_trial(optuna.trial.create_trial(params={"x": value},
                                                  distributions={"x": knob}, value=value))
    for _ in range(running):
        study.ask({"x": knob})
    return study


def test_tpe_models_the_best_and_the_most_recent_trials_within_its_window():
    from tune.search import BEST_KEPT, recent_window

    values = [((7 * i) % 100) / 100 for i in range(300)]  # the best scattered through the study
    trials = _finished_study(values, running=3).trials
    assert recent_window(trials, 400, maximize=True) == trials  # within the window: every trial
    kept = recent_window(trials, 100, maximize=True)
    numbers = [t.number for t in kept]
    assert numbers == sorted(numbers) and len(kept) == 100 + 3
    assert {t.number for t in kept if t.state == optuna.trial.TrialState.RUNNING} == {300, 301, 302}
    best = sorted(range(300), key=lambda i: values[i], reverse=True)[:BEST_KEPT]
    recent = [i for i in range(300) if i not in best][-(100 - BEST_KEPT):]
    assert set(numbers) == set(best) | set(recent) | {300, 301, 302}
    worst = recent_window(trials, 100, maximize=False)  # a minimising study keeps its lowest
    assert {t.number for t in worst} >= set(sorted(range(300), key=lambda i: values[i])[:BEST_KEPT])


def test_windowed_tpe_draws_what_plain_tpe_draws_from_the_window():
    """Within the window it is Optuna's TPE; past it, exactly TPE on the windowed trials."""
    from tune.search import WindowedTPESampler, recent_window

    values = [((7 * i) % 100) / 100 for i in range(120)]

    def draw(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> float:
        study.sampler = sampler
        return study.ask().suggest_float("x", 0.0, 1.0)

    plain = draw(optuna.samplers.TPESampler(seed=3), _finished_study(values))
    assert draw(WindowedTPESampler(seed=3, window=500), _finished_study(values)) == plain
    windowed = draw(WindowedTPESampler(seed=3, window=50), _finished_study(values))
    kept = [t.value for t in recent_window(_finished_study(values).trials, 50, maximize=True)]
    assert windowed == draw(optuna.samplers.TPESampler(seed=3), _finished_study(kept))
    assert windowed != plain
