"""One small real sweep (local Ray, 2 trials) over a user's own setting, defined in a module
that only the sweep's working directory holds, with all three trackers on: TensorBoard event
files, an MLflow store with one run per trial, W&B offline run folders. A second, near-free
sweep in the same storage checks --time-budget."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SWEEP_SMOKE

SETTING_MODULE = '''
"""A user's own data: generated 1x28x28 images, two partitions."""
from cmg.data import Setting, register_setting
from cmg.data.synthetic import synthetic_images


def load_bands(root, download=False):
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
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("own_setting")
    (work / "my_cmg_settings.py").write_text(SETTING_MODULE)
    (work / "space.yaml").write_text("latent_dim: 16\nepochs: 1\nood_per_batch: 64\n")
    storage = work / "sweeps"
    proc = sweep(work, "--setting", "my_cmg_settings:my_bands", "--num-samples", "2",
                 "--storage", str(storage), "--name", "logged", "--space", "space.yaml",
                 "--scheduler", "none", "--max-failures", "0", "--no-prewarm", "--logger", "tensorboard",
                 "--logger", "mlflow", "--logger", "wandb", "--time-budget", "1h", *SWEEP_SMOKE,
                 env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    experiment = storage / "logged"
    trials = sorted(p for p in experiment.glob("stage2_trainable_*") if p.is_dir())
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


def test_wandb_offline_writes_a_run_folder_per_trial(logged_sweep):
    for trial in logged_sweep["trials"]:
        runs = list((trial / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list(trial.iterdir())
        assert list(runs[0].glob("*.wandb"))


def test_time_budget_stops_the_sweep_and_still_reports(logged_sweep):
    """The budget is spent before the search starts: no trial may finish, yet the sweep ends
    cleanly with its summary (stage 1 is reused from the logged sweep: near-free)."""
    proc = sweep(logged_sweep["work"], "--setting-module", "my_cmg_settings", "--setting",
                 "my_bands", "--num-samples", "4", "--storage", str(logged_sweep["storage"]),
                 "--name", "budget", "--space", "space.yaml", "--scheduler", "none",
                 "--no-prewarm", "--time-budget", "0.001s", *SWEEP_SMOKE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((logged_sweep["storage"] / "budget" / "summary.json").read_text())
    assert summary["trials"]["complete"] == 0 and summary["trials"]["total"] < 4


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
