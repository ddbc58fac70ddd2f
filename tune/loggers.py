"""Where a sweep's metrics go besides its own files: TensorBoard, MLflow, Weights & Biases.

Ray Tune's logger callbacks do the work; every trial logs its configuration and every metric it
reports (`val_auroc_mean` and the rest, after each partition)::

    python -m tune.sweep --logger tensorboard          # event files in each trial folder
    python -m tune.sweep --logger mlflow               # EXPERIMENT/mlflow.db, or $MLFLOW_TRACKING_URI

(MLflow 3 refuses its old file store unless MLFLOW_ALLOW_FILE_STORE=true; SQLite needs no server.)
    WANDB_MODE=offline python -m tune.sweep --logger wandb

Without a --logger, a sweep writes only Ray's JSON and CSV files (result.json, progress.csv,
params.json), which `analysis` reads. `--time-budget` durations are parsed here too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from cmg.errors import fail
from cmg.results import is_uri

# logger -> (the package it needs, how to install it)
LOGGERS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX (part of ray[tune])"),
    "mlflow": ("mlflow", "pip install 'cmg-sweep[mlflow]'"),
    "wandb": ("wandb", "pip install 'cmg-sweep[wandb]'"),
}


def check_loggers(names: list[str], storage: str) -> None:
    """Fail with one line, before Ray starts, when a chosen logger's package is not installed
    or it has nowhere to write."""
    for name in dict.fromkeys(names):
        package, install = LOGGERS[name]
        if importlib.util.find_spec(package) is None:
            fail(f"--logger {name} needs the {package} package: {install}")
    if "mlflow" in names and is_uri(storage) and not os.environ.get("MLFLOW_TRACKING_URI"):
        fail("--logger mlflow with a remote --storage: set MLFLOW_TRACKING_URI")


def logger_callbacks(names: list[str], experiment: str, name: str) -> list:
    """Ray's own result files (JSON, CSV) plus a callback per chosen tracker.

    The caller sets TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1, so that Ray does not add its TensorBoard
    logger to every sweep on its own."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list = [JsonLoggerCallback(), CSVLoggerCallback()]
    for chosen in dict.fromkeys(names):
        if chosen == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        elif chosen == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = (os.environ.get("MLFLOW_TRACKING_URI")
                   or f"sqlite:///{os.path.join(experiment, 'mlflow.db')}")
            callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name,
                                                  tags={"sweep": name}))
        elif chosen == "wandb":
            from tune.wandb_logger import FinishedWandbLoggerCallback  # see there: why

            callbacks.append(FinishedWandbLoggerCallback(
                project=os.environ.get("WANDB_PROJECT", name), group=name, log_config=True))
    return callbacks


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90m', '2h', '1.5h', '45s', '1d' or plain seconds ('3600') -> seconds (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a duration; use e.g. 90m, 2h or 3600 (seconds)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
