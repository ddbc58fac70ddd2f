"""Ray Tune + Optuna sweeps over CMG: `python -m tune.sweep` (see tune/sweep.py), the Ray
trainables, the train-once stage-1 store and the search space."""
