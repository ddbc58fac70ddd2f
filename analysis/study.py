"""Parameter importances from a sweep's Optuna study, with Optuna's own evaluator.

    importance("experiments/same_dataset_mnist-CMG-energy-demo")
    #   param          importance
    #   lr             0.41
    #   sigma          0.22 ...

The study gives the search space (each parameter's distribution: range, log scale, choices);
the objective of each configuration comes from the trial files, over complete configurations
only (every partition). The study's own values cannot be used as they are: Tune tells Optuna
the running mean of a trial that ASHA stopped after one or two partitions, and that mean is not
comparable with a mean over all of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from pyarrow import fs as pafs

from analysis.trials import (NotAnExperiment, aggregate, check_selection_metric, is_complete,
                             load_trials)
from cmg.results import STUDY_JOURNAL, Experiment


def load_study(experiment: str | Path, study_storage: str | None = None):
    """The experiment's Optuna study: from `study_storage` (an Optuna storage URL such as
    postgresql://... or sqlite:///...) or else the journal file in the experiment folder. The
    study's name is the sweep's (its manifest's `--name`: NAME/arm-ARM for an arm's study of
    tune.sweep --arms), else the experiment folder's name."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    exp = Experiment.open(experiment)
    filesystem, root = exp.filesystem, exp.root
    name = (exp.manifest or {}).get("options", {}).get("name", exp.name)
    if study_storage is not None:
        storage = study_storage
    elif isinstance(filesystem, pafs.LocalFileSystem) and Path(root, STUDY_JOURNAL).is_file():
        storage = JournalStorage(JournalFileBackend(str(Path(root, STUDY_JOURNAL))))
    else:
        raise NotAnExperiment(f"no Optuna study in {experiment} ({STUDY_JOURNAL}); pass the URL the "
                              "sweep used with --study-storage")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except (KeyError, ValueError, ImportError) as err:
        raise NotAnExperiment(f"cannot load study {name!r}: {err}; check --study-storage") from None


def importance(experiment: str | Path, study_storage: str | None = None,
               by: str = "val_auroc", seed: int = 0,
               table: pd.DataFrame | None = None, allow_test: bool = False) -> pd.DataFrame:
    """Importance of each searched parameter for the mean `by` over the five partitions
    (Optuna's fANOVA evaluator, seeded), highest first; columns `param`, `importance`.
    Parameters drawn only in some configurations (e.g. mask_prob) are left out, as Optuna does.
    Empty when fewer than two complete configurations exist. Pass `table` (from `aggregate`) if
    you have it, so the trial files are not read again. A test metric as `by` only with
    allow_test=True."""
    check_selection_metric(by, allow_test)
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    study = load_study(experiment, study_storage)
    distributions: dict = {}
    for trial in study.get_trials(deepcopy=False):
        distributions.update(trial.distributions)
    if table is None:
        table = aggregate(load_trials(experiment))
    complete = table[is_complete(table) & table[f"{by}_mean"].notna()]
    trials = []
    for _, row in complete.iterrows():
        params = {name: _native(row[f"param_{name}"]) for name in distributions
                  if f"param_{name}" in row and _present(row[f"param_{name}"])}
        trials.append(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=float(row[f"{by}_mean"])))
    empty = pd.DataFrame({"param": pd.Series(dtype=str), "importance": pd.Series(dtype=float)})
    if len(trials) < 2:
        return empty
    direction = "minimize" if by.endswith("fpr95") else "maximize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:  # in memory: the sweep's study is not touched
        scratch = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    scratch.add_trials(trials)
    try:
        scores = get_param_importances(scratch, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError):  # no parameter varies across the complete trials
        return empty
    return pd.DataFrame({"param": list(scores), "importance": list(scores.values())})


def _present(value) -> bool:
    return not (isinstance(value, float) and math.isnan(value))


def _native(value):
    """pandas hands back numpy scalars; Optuna's distributions compare with plain Python."""
    return value.item() if hasattr(value, "item") else value
