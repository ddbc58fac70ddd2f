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
from pyarrow import fs as pafs

from analysis.trials import NotAnExperiment, open_experiment
from cmg.config import budget_config, seed_overrides
from cmg.results import TRIAL_FILE, TRIAL_PREFIX, scores_file

SCORE_INFO = ("split", "kind", "label", "partition")  # the columns that are not scores


def trial_folder(experiment: str, trial_id: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a trial's folder (Tune names it `<TRIAL_PREFIX>_<id>_...`)."""
    filesystem, root = open_experiment(experiment)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = [i.path for i in infos if i.type == pafs.FileType.Directory
             and i.base_name.startswith(f"{TRIAL_PREFIX}_{trial_id}_")]
    if len(found) != 1:
        raise NotAnExperiment(f"no trial {trial_id} in {experiment}; the trial ids are in "
                              "report/summary.csv")
    return filesystem, found[0]


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        raise NotAnExperiment(f"{path} is missing; was it written by this version of "
                              "tune.sweep?") from None


def load_trial_record(experiment: str, trial_id: str) -> dict[str, Any]:
    """The trial's `trial.json`: setting, family, budget, device, resolved config, data."""
    filesystem, folder = trial_folder(experiment, trial_id)
    return json.loads(read_bytes(filesystem, f"{folder}/{TRIAL_FILE}"))


def load_scores(experiment: str, trial_id: str) -> pd.DataFrame:
    """Every partition's per-image scores of a trial, with a `partition` column; empty if the
    trial wrote none."""
    filesystem, folder = trial_folder(experiment, trial_id)
    infos = filesystem.get_file_info(pafs.FileSelector(f"{folder}/scores", allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.base_name.endswith(".parquet"))
    frames = []
    for name in names:
        partition = int(name.removeprefix("partition-").removesuffix(".parquet"))
        frame = pd.read_parquet(io.BytesIO(read_bytes(filesystem,
                                                      f"{folder}/{scores_file(partition)}")))
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
    config, budget = trial["config"], trial["budget"]
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
               "--seed", str(seed), "--device", trial["device"], "--data-root", trial["data_root"]]
    if trial.get("ood_datasets") not in (None, "all"):
        command += ["--ood-dataset", trial["ood_datasets"]]
    if trial.get("backbone"):
        command += ["--backbone", trial["backbone"]["path"],
                    "--backbone-format", trial["backbone"]["format"]]
    for item in sets:
        command += ["--set", item]
    return shlex.join(command)
