"""Reports over sweep results: pandas tables from the files `tune.sweep` writes.
Needs neither Ray nor torch (in progress: figures, report command and notebook to come)."""

from analysis.trials import NotAnExperiment, aggregate, leaderboard, load_trials

__all__ = ["NotAnExperiment", "aggregate", "leaderboard", "load_trials"]
