"""The sweep's search algorithm: Optuna's TPE through Ray Tune, one study trial per Ray trial,
across any number of interruptions and resumes (driver-only: imports Ray and Optuna).

    searcher = SweepSearcher(space=..., metric="val_auroc_mean", mode="max", storage=...,
                             seed=0, ...)           # TPE as `sweep_sampler(seed)` builds it
    search_alg = SweepSearch(searcher)          # or SweepSearch(ConcurrencyLimiter(searcher, 2))
    tune.TuneConfig(search_alg=search_alg, num_samples=16, ...)
    # resume with more configurations: before Tuner.restore(...).fit()
    SweepSearch.grow_to = 24

What it guarantees, by construction rather than by catching errors:
- the study is the truth: a result or completion for a study trial that is already finished
  (told by a driver that was killed before Ray Tune saved that fact) is not told again;
- a study trial left RUNNING by a driver killed after asking it but before Ray Tune saved the Ray
  trial (an orphan) is adopted by the next Ray trial, with the parameters already drawn, so the
  study holds one trial per Ray trial; only orphans left over when the sweep ends are failed,
  with a `fail_reason` (`fail_orphans`);
- a trial that ASHA stopped before its last partition is told PRUNED (Optuna then records its
  last reported running mean as its value), a Ray error is told FAIL with a `fail_reason`, and only
  a configuration that finished every partition is COMPLETE;
- a trial that Tune itself stopped (`--time-budget`), which Tune hands to no searcher callback, is
  told PRUNED like an ASHA stop when the sweep ends (`prune_stopped`; each study trial records
  its Ray trial's id).
"""

from __future__ import annotations

import functools
import heapq
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from cmg.results import OBJECTIVE
from tune.space import suggest

RAY_TRIAL_ATTR = "ray_trial_id"  # a study trial's system attribute: the Ray trial it maps to
ORPHAN_REASON = ("orphan: asked by a sweep driver that stopped before Ray Tune saved the trial, "
                 "and no later Ray trial adopted it")


# TPE models at most this many finished trials: the BEST_KEPT best complete ones and the most
# recent others. An ask reads every trial it models several times over (the search space's
# groups, the split into good and bad, each group's densities), so its cost, paid inside Ray
# Tune's driver loop while trials wait in `tune.report`, would grow with the study; bounded, it
# stays flat past a few hundred trials. TPE weighs older trials down anyway, and its "good" set
# is at most the 25 best (Optuna's default gamma), which the window always holds.
TPE_WINDOW = 500
BEST_KEPT = 25
_FINISHED = frozenset(s for s in TrialState if s.is_finished())


def recent_window(trials: list[FrozenTrial], window: int, maximize: bool) -> list[FrozenTrial]:
    """`trials` (in study order) as the sweep's TPE models them: all of them while at most
    `window` are finished; past that, the unfinished ones (running: the constant liar), the
    BEST_KEPT best complete ones and the most recent other finished ones, `window` in all.
    Called several times per ask: a few flat passes over the trials, no sort."""
    finished = [t for t in trials if t.state in _FINISHED]
    if len(finished) <= window:
        return trials
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    pick = heapq.nlargest if maximize else heapq.nsmallest
    keep = {t.number for t in pick(BEST_KEPT, complete, key=lambda t: t.value)}
    for t in reversed(finished):
        if len(keep) >= window:
            break
        keep.add(t.number)
    return [t for t in trials if t.number in keep or t.state not in _FINISHED]


class _WindowedStudy:
    """A study whose trials, as a sampler reads them, are `recent_window` of the real ones;
    everything else is the real study."""

    def __init__(self, study: optuna.Study, window: int):
        self._study, self._window = study, window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args, **kwargs) -> list[FrozenTrial]:
        maximize = self._study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        return recent_window(self._study._get_trials(*args, **kwargs), self._window, maximize)


class WindowedTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE on `recent_window(trials, window)` of the study: the same draws while at most
    `window` trials are finished, a flat cost per ask after.

        sampler = WindowedTPESampler(seed=0, window=500, multivariate=True, group=True)
    """

    def __init__(self, *args, window: int = TPE_WINDOW, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = window

    def infer_relative_search_space(self, study, trial):
        return super().infer_relative_search_space(_WindowedStudy(study, self.window), trial)

    def sample_relative(self, study, trial, search_space):
        return super().sample_relative(_WindowedStudy(study, self.window), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return super().sample_independent(_WindowedStudy(study, self.window), trial, param_name,
                                          param_distribution)


def sweep_sampler(seed: int | None) -> WindowedTPESampler:
    """The sweep's TPE, its options chosen here rather than left to the installed Optuna's
    defaults: constant liar (trials still RUNNING count as bad, so 64 trials at once spread out
    instead of piling on one point), multivariate (the knobs interact), grouped (the space is
    conditional: mixing and energy knobs exist only in some modes, and each group of parameters
    that appear together is modelled jointly), and a window of TPE_WINDOW trials."""
    with warnings.catch_warnings():  # `group` (and, before Optuna 5, the others) are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return WindowedTPESampler(seed=seed, constant_liar=True, multivariate=True, group=True)


class SweepSearcher(OptunaSearch):
    """OptunaSearch whose study trials map one-to-one to Ray trials (see the module doc), with
    `sweep_sampler(seed)` as its sampler."""

    def __init__(self, *args, seed: int | None = None, **kwargs):
        super().__init__(*args, sampler=sweep_sampler(seed), **kwargs)

    def _frozen(self, trial_id: str) -> optuna.trial.FrozenTrial:
        ot_trial = self._ot_trials[trial_id]
        return self._ot_study._storage.get_trial(ot_trial._trial_id)

    def _orphans(self) -> list[int]:
        """Study trial ids RUNNING that no Ray trial of this searcher maps to."""
        mapped = {t._trial_id for t in self._ot_trials.values()}
        return [t._trial_id for t in self._ot_study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id not in mapped]

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and self._ot_study is not None:
            orphans = self._orphans()
            if orphans:  # its parameters were drawn already: the define-by-run space reuses them
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphans[0])
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_study._storage.set_trial_system_attr(self._ot_trials[trial_id]._trial_id,
                                                          RAY_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._frozen(trial_id).state.is_finished():
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or self._frozen(trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return
        number = self._ot_trials[trial_id]._trial_id
        value = (result or {}).get(self.metric)
        if error or value is None:
            self._ot_study._storage.set_trial_system_attr(
                number, "fail_reason", f"Ray Tune trial {trial_id} errored (see its error.txt)"
                if error else f"Ray Tune trial {trial_id} ended without reporting {self.metric}")
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
        elif result.get("partitions_done", 0) < result.get("partitions_total", 0):
            # Ray Tune hands a stopping result to on_trial_complete only, never to
            # on_trial_result: report it, so the pruned trial's value is its last running mean.
            step = result.get("training_iteration")
            if step is not None and step not in self._frozen(trial_id).intermediate_values:
                self._ot_trials[trial_id].report(value, step)
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        else:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)


def sweep_searcher(spec) -> SweepSearcher:
    """The searcher of a sweep (a tune.spec.SweepSpec): its define-by-run space, the reference
    defaults as the first point, maximising the objective in the sweep's study."""
    return SweepSearcher(space=functools.partial(suggest, space=spec.space, modes=spec.modes),
                         metric=OBJECTIVE, mode="max", points_to_evaluate=[spec.first],
                         seed=spec.options.seed, study_name=spec.options.name,
                         storage=spec.study_storage())


class SweepSearch(SearchGenerator):
    """Ray Tune's SearchGenerator whose number of samples can grow when the sweep is resumed:
    set the class attribute `grow_to` before `Tuner.restore(...).fit()` (the saved count wins
    when it is larger)."""

    grow_to: int = 0

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if SweepSearch.grow_to > self._total_samples:
            self._total_samples = SweepSearch.grow_to
            self._finished = False


def prune_stopped(storage: optuna.storages.BaseStorage, study_name: str,
                  last_results: list[dict[str, Any]]) -> int:
    """Tell PRUNED, valued at its last running mean, each study trial still RUNNING whose Ray
    trial reported (its last result in `last_results`) and was then stopped by Tune itself (the
    time budget: Tune calls no searcher method for it); return how many."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    last = {r["trial_id"]: r for r in last_results if r.get(OBJECTIVE) is not None}
    told = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        result = last.get(t.system_attrs.get(RAY_TRIAL_ATTR))
        if result is None:
            continue
        step = result.get("training_iteration", len(t.intermediate_values) + 1)
        if step not in t.intermediate_values:
            storage.set_trial_intermediate_value(t._trial_id, step, result[OBJECTIVE])
        study.tell(t.number, state=TrialState.PRUNED)
        told += 1
    return told


def fail_orphans(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """Fail the study trials still RUNNING once the whole sweep has ended (orphans that no Ray
    trial adopted), each with its `fail_reason`; return how many."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        storage.set_trial_system_attr(t._trial_id, "fail_reason", ORPHAN_REASON)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(orphans)
