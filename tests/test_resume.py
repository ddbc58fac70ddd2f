"""Interrupting a real sweep (Ctrl-C, SIGTERM, SIGKILL) and continuing it with --resume; the
experiment's manifest.json; the study states; start failures that leave nothing behind.

One small sweep (2 configurations, no early stopping, one at a time) is interrupted four times
in a row (a double Ctrl-C in the stage-1 prewarm, Ctrl-C, SIGTERM and SIGKILL in the search) and
resumed until done; every wait is on real progress (files on the store, lines in result.json)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import ROOT, SWEEP_SMOKE, assert_refused, live_rows, result_rows, run_sweep
from cmg.results import NotAnExperiment
from tune.manifest import spec_from_manifest, with_manifest_defaults
from tune.spec import SweepOptions, space_from_dict
from tune.driver import _study_progress
from tune.sweep import build_parser, build_spec, given_options

SAMPLES = 2
LINE = re.compile(r"^interrupted after (\d+) of 2 configurations; continue with: "
                  r"python -m tune\.sweep --storage (\S+) --name k --resume$")


def partitions(experiment: Path) -> dict[str, list[int]]:
    """Trial folder -> the partitions its result.json reports to Tune, in order (a line still
    being written is left out): what Tune recorded, at its last snapshot."""
    return {folder.name: [row["partition"] for row in result_rows(folder)]
            for folder in sorted(experiment.glob("trial-*"))
            if (folder / "result.json").exists()}


def reported(experiment: Path) -> int:
    """Partitions finished so far by all trials (their live rows)."""
    return sum(len(live_rows(folder)) for folder in experiment.glob("trial-*"))


def load_study(experiment: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tune.sweep", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as in a terminal


def interrupt_when(proc: subprocess.Popen, ready, sig: int, group: bool) -> tuple[str, str]:
    """Send `sig` (to the process group, as Ctrl-C does, if `group`) once `ready()` holds."""
    deadline = time.time() + 600
    while not ready():
        assert proc.poll() is None, f"the sweep ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "the sweep made no progress"
        time.sleep(0.2)
    (os.killpg if group else os.kill)(proc.pid, sig)
    return proc.communicate(timeout=300)


def interrupt_twice_when(proc: subprocess.Popen, ready) -> tuple[str, str]:
    """Ctrl-C pressed twice, 0.2 s apart (an impatient user), once `ready()` holds."""
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"the sweep ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "the sweep made no progress"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=300)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, mnist_available):
    """The sweep stopped twice: by a double Ctrl-C while the prewarm trains stage 1, then, resumed,
    by Ctrl-C while its first trial is between partitions 1 and 5."""
    storage = tmp_path_factory.mktemp("resume")
    (storage / "space.yaml").write_text("latent_dim: 32\nepochs: 1\nood_per_batch: 64\n")
    args = ["--num-samples", str(SAMPLES), "--storage", str(storage), "--name", "k", "--space",
            str(storage / "space.yaml"), "--max-concurrent", "1", "--scheduler", "none",
            *SWEEP_SMOKE]
    experiment = storage / "k"
    proc = start(*args)
    _, prewarm_err = interrupt_twice_when(
        proc, lambda: any(storage.glob("stage1/*/partial/owner.json")))
    prewarm = {"rc": proc.returncode, "stderr": prewarm_err,
               "published": sorted(p.parent.name for p in storage.glob("stage1/*/meta.json"))}
    proc = start("--storage", str(storage), "--name", "k", "--resume")
    out, err = interrupt_when(proc, lambda: 0 < reported(experiment) < 5, signal.SIGINT, True)
    return {"storage": storage, "experiment": experiment, "args": args, "rc": proc.returncode,
            "stderr": err, "partitions": partitions(experiment), "prewarm": prewarm}


def test_a_double_ctrl_c_during_the_prewarm_stops_at_once_with_the_resume_line(interrupted):
    prewarm = interrupted["prewarm"]
    assert prewarm["rc"] == 130, prewarm["stderr"]
    assert "Traceback" not in prewarm["stderr"]
    match = LINE.match(prewarm["stderr"].strip().splitlines()[-1])
    assert match and int(match[1]) == 0, prewarm["stderr"]
    assert len(prewarm["published"]) < 5  # stopped in the middle of stage 1


def test_ctrl_c_prints_the_resume_command_exits_130_and_writes_no_summary(interrupted):
    assert interrupted["rc"] == 130, interrupted["stderr"]
    lines = interrupted["stderr"].strip().splitlines()
    match = LINE.match(lines[-1])
    assert match and match[2] == str(interrupted["storage"]), lines[-1]
    assert int(match[1]) == 0  # the first configuration was mid-way
    assert "Traceback" not in interrupted["stderr"]
    experiment = interrupted["experiment"]
    assert not (experiment / "summary.json").exists() and not (experiment / "report").exists()
    states = [t.state for t in load_study(experiment, "k").trials]
    assert states == [TrialState.RUNNING]  # left to the resume, not failed


def test_manifest_records_how_the_sweep_was_launched(interrupted):
    manifest = json.loads((interrupted["experiment"] / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 0 and manifest["options"]["num_samples"] == SAMPLES
    assert manifest["options"]["storage"] == str(interrupted["storage"])
    assert "--scheduler none" in manifest["command"]
    # the spec serialised: its options read back into the typed object, what they resolved to
    options = SweepOptions.from_dict(manifest["options"])
    assert options.scheduler == "none" and options.name == "k" and options.loggers == ()
    assert manifest["partitions"] == [1, 2, 3, 4, 5] and manifest["ood_sets"] == []
    space = space_from_dict(manifest["space"])
    assert space["latent_dim"].fixed == 32 and space["epochs"].fixed == 1
    assert space["sigma"].low == 0.25 and space["sigma"].log
    assert manifest["run_config"]["data"]["train_limit"] == 192
    assert manifest["run_config"]["stage2"]["seed"] == 0
    assert set(manifest["versions"]) == {"torch", "ray", "optuna", "cmg-sweep"}
    assert manifest["versions"]["optuna"] == optuna.__version__
    assert manifest["git"] is None or len(manifest["git"]["commit"]) == 40
    assert manifest["host"]["cpus"] == os.cpu_count()


def test_the_manifest_loads_into_the_spec_that_made_it_in_either_format(interrupted):
    manifest = json.loads((interrupted["experiment"] / "manifest.json").read_text())
    spec = build_spec([*interrupted["args"], "--resume"])[0]  # as the command line resolves it
    assert manifest["format"] == 2 and spec_from_manifest(manifest) == spec
    earlier = {**manifest, "options": {k: v for k, v in manifest["options"].items()
                                       if k != "data_root_given"}}  # before that option
    assert spec_from_manifest(earlier) == spec
    # format 1 (before the spec was whole): options, space and RunConfig, no --select-on yet;
    # the rest resolves as the sweep resolved it
    old = {k: v for k, v in manifest.items()
           if k not in ("format", "setting", "modules", "modes", "first", "backbone")}
    old["options"] = {k: v for k, v in manifest["options"].items()
                      if k not in ("select_on", "data_root_given")}
    assert spec_from_manifest(old) == spec
    with pytest.raises(NotAnExperiment, match="format 3"):
        spec_from_manifest({**manifest, "format": 3})


def test_resume_refuses_changed_settings_naming_each(interrupted):
    store = str(interrupted["storage"])
    (interrupted["storage"] / "wider.yaml").write_text("latent_dim: 64\nepochs: 1\n")
    proc = run_sweep("--storage", store, "--name", "k", "--resume", "--seed", "5", "--budget",
                     "quick", "--space", str(interrupted["storage"] / "wider.yaml"),
                     "--num-samples", "1", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for words in ("--seed 0 -> 5", "--budget smoke -> quick", "--num-samples 2 -> 1",
                  "stage2.seed 0 -> 5"):
        assert words in proc.stderr
    assert re.search(r"search space: [^;]*latent_dim", proc.stderr)


def test_resume_after_sigint_sigterm_and_sigkill_finishes_every_partition_once(interrupted):
    experiment, store = interrupted["experiment"], str(interrupted["storage"])
    resume = ["--storage", store, "--name", "k", "--resume"]  # the rest from manifest.json
    # SIGTERM to the driver alone (as a job manager sends it) once the resume made progress
    before = reported(experiment)
    proc = start(*resume)
    _, err = interrupt_when(proc, lambda: reported(experiment) > before, signal.SIGTERM, False)
    assert proc.returncode == 130 and LINE.match(err.strip().splitlines()[-1]), err
    # SIGKILL of the driver and its local Ray, once more progress is made
    before = reported(experiment)
    proc = start(*resume)
    interrupt_when(proc, lambda: reported(experiment) > before, signal.SIGKILL, True)
    assert proc.returncode == -signal.SIGKILL
    done = run_sweep(*resume, "--no-quiet")
    assert done.returncode == 0, done.stderr
    # its progress counts on from the study's finished trials, on its own clock (not those of
    # the run that began the sweep, whose progress Tune pickled, --quiet and all)
    assert re.search(r"^\[sweep\] 100\.0% trials=2/2 .*\| (\d+m\d\ds|\d+s) elapsed, ETA 0s$",
                     done.stderr, re.M), done.stderr
    found = partitions(experiment)
    assert len(found) == SAMPLES
    # each trial's own record holds every partition exactly once, in order: nothing lost
    assert all([r["partition"] for r in live_rows(experiment / f)] == [1, 2, 3, 4, 5]
               for f in found), found
    # Tune's result.json too, except that a driver SIGKILLed between its once-a-minute snapshots
    # (TUNE_GLOBAL_CHECKPOINT_S=60, docs/cluster.md) may redo the partitions since the last one:
    # they are reported again, in order, never skipped
    for p in found.values():
        assert sorted(set(p)) == [1, 2, 3, 4, 5] and p[-1] == 5, found
        assert all(b == a + 1 or b <= a for a, b in zip(p, p[1:])), found  # a redo restarts
    for folder, before in interrupted["partitions"].items():  # the interrupted trial went on
        assert found[folder][:len(before)] == before
    study = load_study(experiment, "k")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * SAMPLES
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == SAMPLES
    finals = [json.loads(line) for line in (experiment / "optuna.journal").read_text().splitlines()]
    finals = [op["trial_id"] for op in finals if op["op_code"] == 6 and op["state"] != 0]
    assert sorted(finals) == sorted({t._trial_id for t in study.trials})  # each told once
    means = sorted(result_rows(experiment / f)[-1]["val_auroc_mean"] for f in found)
    assert sorted(t.value for t in study.trials) == pytest.approx(means)
    # what a resumed run's progress line starts from: the study's finished trials and best value
    assert _study_progress(build_spec(resume)[0]) == (SAMPLES, pytest.approx(max(means)))
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"total": 2, "complete": 2, "pruned": 0, "failed": 0}
    assert summary["study"]["orphans_failed"] == 0
    manifest = json.loads((experiment / "manifest.json").read_text())
    assert len(manifest["resumed"]) == 4
    print(f"SIGINT rc {interrupted['rc']}: {interrupted['stderr'].strip().splitlines()[-1]}\n"
          f"SIGTERM rc 130: {err.strip().splitlines()[-1]}\nSIGKILL rc {proc.returncode}\n"
          f"resume rc {done.returncode}: {done.stdout.strip().splitlines()[0]}\n"
          f"partitions {list(found.values())}\nstudy {[t.state.name for t in study.trials]}")


def test_resume_takes_left_out_options_from_the_manifest():
    parser = build_parser()
    argv = ["--resume", "--name", "k", "--num-samples", "8", "--no-prewarm"]
    assert given_options(parser, argv) == {"resume", "name", "num_samples", "prewarm"}
    manifest = {"options": {**vars(parser.parse_args([])), "seed": 4, "num_samples": 6},
                "space": {}, "run_config": {}}
    args = vars(parser.parse_args(argv))
    merged = with_manifest_defaults(args, given_options(parser, argv), manifest)
    assert merged["seed"] == 4 and merged["num_samples"] == 8 and merged["prewarm"] is False


@pytest.mark.parametrize("args, words", [
    (["--cpus-per-trial", "0"], ["--cpus-per-trial must be above 0"]),
    (["--storage", "/proc/nope"], ["cannot create the experiment folder", "--storage"]),
    (["--data-root", "FILE"], ["is a file, not a folder", "--data-root"]),
    (["--study-storage", "sqlite:////nonexistent/x.db"], ["cannot open study storage"]),
    (["--address", "127.0.0.1:1"], ["no Ray cluster answers at 127.0.0.1:1", "--address"]),
])
def test_a_failed_start_exits_2_with_one_line_and_leaves_nothing(tmp_path, args, words):
    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    assert_refused(tmp_path / "store", *args, words=words)
    assert not Path("/proc/nope").exists()


@pytest.mark.slow
def test_gpus_that_no_node_has_fail_at_once_and_leave_nothing(tmp_path, mnist_available):
    storage = tmp_path / "store" / "deeper"
    proc = run_sweep("--storage", str(storage), "--gpus-per-trial", "2", *SWEEP_SMOKE,
                     timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--gpus-per-trial 2 cannot be placed" in errors[0]
    assert re.search(r"the cluster has \d+ GPUs", errors[0])
    assert not (tmp_path / "store").exists()


def test_searcher_adopts_an_orphan_prunes_a_stopped_trial_and_never_tells_twice():
    from tune.search import SweepSearcher, fail_orphans
    from tune.space import default_space, mode_choices, suggest
    from cmg.config import budget_config
    import functools

    storage = optuna.storages.InMemoryStorage()
    space = functools.partial(suggest, space=default_space(budget_config("smoke")),
                              modes=mode_choices("CMG-energy"))

    def searcher():
        return SweepSearcher(space=space, metric="val_auroc_mean", mode="max", seed=1,
                             study_name="s", storage=storage)

    killed = searcher()
    params = killed.suggest("ray-1")  # asked; then the driver dies before Tune saves the trial
    restored = searcher()
    assert restored.suggest("ray-2") == params  # the orphan is adopted with its parameters
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 1
    for step, mean in ((1, 0.7), (2, 0.6)):
        restored.on_trial_result("ray-2", {"val_auroc_mean": mean, "training_iteration": step})
    last = {"val_auroc_mean": 0.6, "partitions_done": 2, "partitions_total": 5}
    restored.on_trial_complete("ray-2", last)
    restored.on_trial_complete("ray-2", last)  # a second completion (a restored driver)
    killed.on_trial_result("ray-1", {"val_auroc_mean": 0.9, "training_iteration": 3})
    killed.on_trial_complete("ray-1", {**last, "partitions_done": 5})
    trial = optuna.load_study(study_name="s", storage=storage).trials[0]
    assert trial.state == TrialState.PRUNED and trial.value == 0.6
    assert trial.intermediate_values == {1: 0.7, 2: 0.6}
    other = searcher()
    other.suggest("ray-3")
    other.on_trial_complete("ray-3", error=True)
    failed = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert failed.state == TrialState.FAIL and "ray-3 errored" in failed.system_attrs["fail_reason"]
    searcher().suggest("ray-4")  # asked, never run: failed when the sweep ends
    assert fail_orphans(storage, "s") == 1
    assert optuna.load_study(study_name="s", storage=storage).trials[2].state == TrialState.FAIL
