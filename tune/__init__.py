"""Ray Tune + Optuna sweeps over CMG (not built yet: see the project's issue on tune/)."""
