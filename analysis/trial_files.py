"""The files a sweep writes into each trial folder beside Tune's own (`cmg.results`): the trial's
record (`trial.json`) and its per-image scores, read from a local folder or a pyarrow URI; and
the `python -m cmg.run` command that reproduces one partition of a trial.

    scores = load_scores("experiments/NAME", trial_id)   # one row per image, `partition` added
    print(reproduce_command(load_trial_record("experiments/NAME", trial_id), partition=1))
"""

from __future__ import annotations

import io
import json
import shlex
from typing import Any

import pandas as pd

from cmg.config import RunConfig, budget_config, seed_overrides
from cmg.results import Experiment, scores_file

SCORE_INFO = ("split", "kind", "label", "partition")  # the columns that are not scores


def load_trial_record(experiment: str, trial_id: str) -> dict[str, Any]:
    """The trial's `trial.json`: setting, family, budget, device, resolved config, data."""
    exp = Experiment.open(experiment)
    return exp.record(exp.trial(trial_id))


def load_scores(experiment: str, trial_id: str) -> pd.DataFrame:
    """Every partition's per-image scores of a trial, with a `partition` column; empty if the
    trial wrote none."""
    exp = Experiment.open(experiment)
    folder = exp.trial(trial_id).name
    frames = []
    for path in exp.files(folder, "scores"):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".parquet"):
            continue
        partition = int(name.removeprefix("partition-").removesuffix(".parquet"))
        frame = pd.read_parquet(io.BytesIO(exp.read_bytes(folder, scores_file(partition))))
        frames.append(frame.assign(partition=partition))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def score_columns(scores: pd.DataFrame) -> list[str]:
    """`cmg` first, then the baselines, as the scores files hold them."""
    return [c for c in scores.columns if c not in SCORE_INFO]


def reproduce_command(trial: dict[str, Any], partition: int) -> str:
    """The `python -m cmg.run` command that reruns one partition of a trial with its exact
    configuration: every knob that differs from the budget's defaults becomes a `--set`, and
    on a CPU the trial's thread count is pinned (OMP_NUM_THREADS): float sums, hence the
    trained models, depend on it."""
    # through RunConfig: a record from before a knob existed says what its run used
    config, budget = RunConfig.from_dict(trial["config"]).to_dict(), trial["budget"]
    seed = config["stage2"]["seed"]
    seeds = seed_overrides(seed)
    mode = config["stage2"]["mode"]
    reference = budget_config(budget, trial["family"], seeds + [f"stage2.mode={mode}"]).to_dict()
    sets = [f"{section}.{key}={value if isinstance(value, str) else json.dumps(value)}"
            for section, values in config.items()
            for key, value in values.items() if value != reference[section][key]]
    threads = [f"OMP_NUM_THREADS={trial['threads']}"] if trial["device"] == "cpu" else []
    command = [*threads, "python", "-m", "cmg.run", "--setting", trial["setting"],
               "--partition", str(partition), "--mode", mode, "--budget", budget,
               "--seed", str(seed), "--device", trial["device"]]
    # the --data-root the sweep was given, as typed (none: the default); records written before
    # it was kept hold only the resolved folder
    root = trial["data_root_given"] if "data_root_given" in trial else trial["data_root"]
    if root is not None:
        command += ["--data-root", root]
    if trial.get("ood_datasets") not in (None, "all"):
        command += ["--ood-dataset", trial["ood_datasets"]]
    if trial.get("backbone"):
        command += ["--backbone", trial["backbone"]["path"],
                    "--backbone-format", trial["backbone"]["format"]]
    for item in sets:
        command += ["--set", item]
    return shlex.join(command)
