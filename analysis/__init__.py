"""Reports over sweep results, from the files `tune.sweep` writes; needs neither Ray nor torch.

    from analysis import load_trials, aggregate, leaderboard, importance
    df = load_trials("experiments/NAME")        # one row per (trial, partition)
    table = aggregate(df)                       # one row per configuration, mean/std/95% CI, lifts
    leaderboard(table)                          # complete configurations, best validation first
    importance("experiments/NAME")              # fANOVA importances on the study's search space
    replicate_table(load_replicates("experiments/NAME"))  # tune.replicate: seeds x partitions
    # python -m analysis.headline REPORT: tuned CMG vs the baselines and default CMG, over seeds

Figures: `analysis.figures`; files: `python -m analysis.report`; notebook:
`analysis/notebooks/sweep_report.ipynb`.
"""

from analysis.replicates import load_replicates, replicate_table
from analysis.study import importance, load_study
from analysis.trials import NotAnExperiment, aggregate, leaderboard, load_trials

__all__ = ["NotAnExperiment", "aggregate", "importance", "leaderboard", "load_replicates",
           "load_study", "load_trials", "replicate_table"]
