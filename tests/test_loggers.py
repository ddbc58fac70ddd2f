"""One small real sweep (local Ray, 2 trials) over a user's own setting, defined in a module
that only the sweep's working directory holds, with all three trackers on: TensorBoard event
files, an MLflow store with one run per trial, W&B offline run folders. A second sweep
in the same storage checks a --time-budget that expires in a trial."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from cmg.results import TRIAL_FILE
from conftest import ROOT, SWEEP_SMOKE, result_rows

SETTING_MODULE = '''
"""A user's own data: generated 1x28x28 images, two partitions."""
import os
import time

import ray

from cmg.data import Setting, register_setting
from cmg.data.synthetic import synthetic_images

_loads_in_this_trial_process = 0


def load_bands(root, download=False):
    """With $SLOW_SECOND_LOAD set (the time-budget test), every load after the first in a
    trial (a Ray actor) takes five minutes: the trial reports partition 1, then waits in 2."""
    global _loads_in_this_trial_process
    in_trial = ray.is_initialized() and ray.get_runtime_context().get_actor_id()
    if os.environ.get("SLOW_SECOND_LOAD") and in_trial:
        _loads_in_this_trial_process += 1
        if _loads_in_this_trial_process > 1:
            time.sleep(300)
    train_x, train_y = synthetic_images(600, seed=1, channels=1, size=28)
    test_x, test_y = synthetic_images(200, seed=2, channels=1, size=28)
    return train_x, train_y, test_x, test_y


register_setting(Setting("my_bands", family="mnist", source=load_bands,
                         partitions={1: (0, 1, 2, 3, 4, 5), 2: (4, 5, 6, 7, 8, 9)}))
'''


def sweep(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m tune.sweep` run from `cwd` (where the user's module is), this repo importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tune.sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=540)


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("own_setting")
    (work / "my_cmg_settings.py").write_text(SETTING_MODULE)
    (work / "space.yaml").write_text("latent_dim: 16\nepochs: 1\nood_per_batch: 64\n")
    storage = work / "sweeps"
    proc = sweep(work, "--setting", "my_cmg_settings:my_bands", "--num-samples", "2",
                 "--storage", str(storage), "--name", "logged", "--space", "space.yaml",
                 "--scheduler", "none", "--max-failures", "0", "--no-prewarm", "--mode", "both",
                 "--logger", "tensorboard",
                 "--logger", "mlflow", "--logger", "wandb", "--time-budget", "1h", *SWEEP_SMOKE,
                 env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    experiment = storage / "logged"
    trials = sorted(p for p in experiment.glob("trial-*") if p.is_dir())
    last = {t: [json.loads(line) for line in (t / "result.json").read_text().splitlines()][-1]
            for t in trials}
    return {"work": work, "storage": storage, "experiment": experiment, "trials": trials,
            "last": last, "proc": proc}


def test_own_setting_from_a_module_runs_in_every_trial(logged_sweep):
    summary = json.loads((logged_sweep["experiment"] / "summary.json").read_text())
    assert summary["trials"] == {"total": 2, "complete": 2, "pruned": 0, "failed": 0}
    for trial, last in logged_sweep["last"].items():
        assert last["partitions_done"] == 2 and last["partitions_total"] == 2
        assert 0.0 <= last["val_auroc_mean"] <= 1.0
    assert (logged_sweep["experiment"] / "report" / "report.md").exists()
    assert "Configuration for experiment" not in logged_sweep["proc"].stdout
    assert "tensorboard --logdir" not in logged_sweep["proc"].stdout  # --quiet: no hint either


def test_mode_both_searches_the_loss_and_each_trial_trains_with_the_mode_it_drew(logged_sweep):
    modes = {}
    for trial in logged_sweep["trials"]:
        params = json.loads((trial / "params.json").read_text())
        record = json.loads((trial / TRIAL_FILE).read_text())
        assert record["config"]["stage2"]["mode"] == params["mode"]
        modes[trial.name] = params["mode"]
    assert sorted(modes.values()) == ["CMG-energy", "CMG-softmax"], modes


def _scalars(event_file: Path) -> dict[str, float]:
    """Last value of every scalar in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, pos = event_file.read_bytes(), {}, 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out[value.tag] = value.simple_value
    return out


def test_tensorboard_event_files_hold_the_objective(logged_sweep):
    for trial, last in logged_sweep["last"].items():
        files = list(trial.glob("events.out.tfevents.*"))
        assert len(files) == 1, list(trial.iterdir())
        scalars = _scalars(files[0])
        assert scalars["ray/tune/val_auroc_mean"] == pytest.approx(last["val_auroc_mean"])
    assert len(list(logged_sweep["experiment"].rglob("events.out.tfevents.*"))) == 2


def test_mlflow_store_has_one_run_per_trial_with_params_and_metrics(logged_sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{logged_sweep['experiment'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logged")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_trial = {last["trial_id"]: last for last in logged_sweep["last"].values()}
    for run in runs:
        (last,) = [v for k, v in by_trial.items() if run.data.tags["trial_name"].endswith(k)]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_auroc_mean"] == pytest.approx(last["val_auroc_mean"])
        assert {"lr", "sigma", "latent_dim"} <= set(run.data.params)


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows an offline W&B run logged: its .wandb file is a LevelDB-style log (a
    7-byte file header, 32 KiB blocks, records of crc32/length/type + data, split across
    blocks as FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def test_wandb_offline_run_of_each_trial_logs_the_objective_of_every_report(logged_sweep):
    for trial, last in logged_sweep["last"].items():
        runs = list((trial / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list(trial.iterdir())
        (run_file,) = runs[0].glob("*.wandb")
        history = [row for row in _wandb_history(run_file) if "val_auroc_mean" in row]
        assert len(history) == last["partitions_done"] == 2  # one row per partition report
        assert history[-1]["val_auroc_mean"] == pytest.approx(last["val_auroc_mean"])


def test_time_budget_expiring_in_a_trial_keeps_its_partitions_and_still_reports(logged_sweep):
    """The budget runs out while the only trial waits in partition 2 (its data loads for five
    minutes; stage 1 is the logged sweep's): the trial stops with partition 1 reported, no other
    starts, and the sweep ends cleanly with its summary, its report and no study trial left
    running."""
    experiment = logged_sweep["storage"] / "budget"
    proc = sweep(logged_sweep["work"], "--setting-module", "my_cmg_settings", "--setting",
                 "my_bands", "--num-samples", "4", "--storage", str(logged_sweep["storage"]),
                 "--name", "budget", "--space", "space.yaml", "--scheduler", "none",
                 "--no-prewarm", "--max-concurrent", "1", "--time-budget", "30s",
                 "--logger", "wandb", *SWEEP_SMOKE,
                 env={"SLOW_SECOND_LOAD": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"total": 1, "complete": 0, "pruned": 1, "failed": 0}
    (trial,) = experiment.glob("trial-*")
    rows = result_rows(trial)
    assert [r["partition"] for r in rows] == [1]  # what it finished is kept
    report = (experiment / "report" / "report.md").read_text()
    assert rows[0]["trial_id"] in report.split("## Trials not on the leaderboard")[1]
    storage = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    (study_trial,) = optuna.load_study(study_name="budget", storage=storage).trials
    assert study_trial.state == TrialState.PRUNED and summary["study"]["stopped_pruned"] == 1
    assert study_trial.value == pytest.approx(rows[0]["val_auroc_mean"])
    # its W&B run holds what it reported (Tune stops such a trial without ending its run)
    (run_file,) = trial.glob("wandb/offline-run-*/*.wandb")
    history = [row for row in _wandb_history(run_file) if "val_auroc_mean" in row]
    assert [row["val_auroc_mean"] for row in history] == pytest.approx([rows[0]["val_auroc_mean"]])


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("1.5h", 5400),
                                           ("3600", 3600), ("45s", 45), ("1d", 86400)])
def test_durations(text, seconds):
    from tune.loggers import parse_duration

    assert parse_duration(text) == seconds


def test_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, capsys):
    from tune.sweep import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["--logger", "mlflow", "--budget", "smoke"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cmg-sweep[mlflow]'" in lines[0], lines
