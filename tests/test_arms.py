"""A sweep per arm (`tune.sweep --arms`): each control arm tuned in its own study with CMG's budget,
continued after Ctrl-C, shown beside the others, replicated at its own best; the same command on
a finished sweep prints its summary, a changed one is refused.

The real sweep runs on a one-partition MNIST setting (a user's setting module), so that its four
studies of two configurations each cost eight trial partitions."""

from __future__ import annotations

import json
import os
import re
import shutil
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

from analysis.replicates import load_replicates
from analysis.trials import trial_rows
from cmg.config import budget_config
from cmg.results import ARMS, Experiment
from conftest import ROOT, SWEEP_SMOKE, assert_refused, run_main
from tune.replicate import chosen_runs, points_to_add, variant_of
from tune.space import IGNORED_BY_ARM, arm_space, default_space
from tune.sweep import build_spec
from tune.manifest import spec_from_manifest

SAMPLES = 2
SETTING_MODULE = '''
from cmg.data import Setting, get_setting, register_setting

mnist = get_setting("same_dataset_mnist")
register_setting(Setting("mnist_one", family="mnist", source=mnist.source,
                         partitions={1: mnist.partitions[1]}))
'''
LINE = re.compile(r"^interrupted after (\d+) of 8 configurations \(4 arms of 2\); continue with: "
                  r"python -m tune\.sweep --storage \S+ --name arms --resume$")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m tune.sweep ARGS` run from `cwd`, where the setting module is."""
    return subprocess.run([sys.executable, "-m", "tune.sweep", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=540)


def study(experiment: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def arms_sweep(tmp_path_factory, mnist_available):
    """`--arms all`, stopped by Ctrl-C once the second arm's study has started a trial, then
    continued with --resume to the end."""
    work = tmp_path_factory.mktemp("arms")
    (work / "one_partition.py").write_text(SETTING_MODULE)
    (work / "space.yaml").write_text("latent_dim: 32\nepochs: 1\nood_per_batch: 64\n"
                                     "lr: {choices: [1.0e-4, 3.0e-2]}\n")
    args = ["--setting-module", "one_partition", "--setting", "mnist_one", "--arms", "all",
            "--num-samples", str(SAMPLES), "--storage", str(work / "sweeps"), "--name", "arms",
            "--space", "space.yaml", "--seed", "3", "--max-concurrent", "1", "--no-report",
            *SWEEP_SMOKE]
    experiment = work / "sweeps" / "arms"
    proc = subprocess.Popen([sys.executable, "-m", "tune.sweep", *args], cwd=work, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 480
    while not any((experiment / "arm-single").glob("trial-*")):
        assert proc.poll() is None, f"the sweep ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "the sweep did not reach the second arm"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stopped = proc.communicate(timeout=300)
    resumed = sweep(work, "--storage", str(work / "sweeps"), "--name", "arms", "--resume")
    return {"work": work, "args": args, "experiment": experiment, "stopped": stopped,
            "stopped_rc": proc.returncode, "resumed": resumed}


def test_ctrl_c_in_the_second_arm_stops_the_sweep_and_resume_finishes_every_arm(arms_sweep):
    assert arms_sweep["stopped_rc"] == 130, arms_sweep["stopped"]
    line = LINE.match(arms_sweep["stopped"].strip().splitlines()[-1])
    assert line and SAMPLES <= int(line[1]) < 2 * SAMPLES, arms_sweep["stopped"]  # CMG's done
    resumed = arms_sweep["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    experiment = arms_sweep["experiment"]
    for arm in ARMS:  # every study ran its configurations, each told once, none left RUNNING
        folder = experiment if arm == "mixed" else experiment / f"arm-{arm}"
        name = "arms" if arm == "mixed" else f"arms/arm-{arm}"
        states = [t.state for t in study(folder, name).trials]
        assert states == [TrialState.COMPLETE] * SAMPLES, (arm, states)
        assert len(list(folder.glob("trial-*"))) == SAMPLES
        assert json.loads((folder / "summary.json").read_text())["trials"]["complete"] == SAMPLES
    manifest = json.loads((experiment / "manifest.json").read_text())
    assert manifest["options"]["arms"] == list(ARMS) and len(manifest["resumed"]) == 1
    # the summary: each arm's best beside the others, one stage-1 store for all
    out = resumed.stdout
    for arm in ARMS:
        assert re.search(rf"^  {arm} +2 trials \(2 complete, 0 pruned, 0 failed\), val AUROC "
                         r"0\.\d{4}   test AUROC 0\.\d{4}$", out, re.M), out
    assert "stage-1 models: 2 trained (1 classifiers, 1 CVAEs)" in out


def test_each_arm_searches_its_own_knobs_with_the_same_budget_seed_and_scheduler(arms_sweep):
    experiment = arms_sweep["experiment"]
    sweep_spec = spec_from_manifest(json.loads((experiment / "manifest.json").read_text()))
    keys = set()
    for arm in ARMS:
        folder = experiment if arm == "mixed" else experiment / f"arm-{arm}"
        spec = spec_from_manifest(json.loads((folder / "manifest.json").read_text()))
        assert spec == sweep_spec.arm(arm)  # the arm's own manifest: the arm's spec
        assert spec.base.stage2.pseudo_ood == arm
        assert (spec.options.num_samples, spec.options.seed, spec.options.scheduler) == (
            SAMPLES, 3, "asha")
        assert not set(IGNORED_BY_ARM[arm]) & set(spec.space)
        for trial in folder.glob("trial-*"):
            params = json.loads((trial / "params.json").read_text())
            assert set(params) - {"mode"} <= set(spec.space), (arm, params)
            rows = trial_rows(trial)
            assert len(rows) == 1
            keys.add(rows[0]["stage1_key"])
        # the first configuration is the reference's defaults of the knobs that act on it
        assert study(folder, spec.options.name).trials[0].params == spec.first
    assert len(keys) == 1  # every arm's every trial on the same stage-1 models


def test_the_same_command_again_prints_the_summary_and_a_changed_one_is_refused(arms_sweep,
                                                                              monkeypatch):
    monkeypatch.chdir(arms_sweep["work"])  # in this process (no Ray starts): the setting module
    monkeypatch.syspath_prepend(str(arms_sweep["work"]))
    again = run_main("tune.sweep", *arms_sweep["args"])
    assert again.returncode == 0, again.stderr
    assert "sweep arms: 2 trials (2 complete" in again.stdout
    assert "  none    2 trials" in again.stdout
    assert re.search(r"sweep arms has finished; continue it with: python -m tune\.sweep --storage "
                     r"\S+ --name arms --resume .*--name", again.stdout), again.stdout
    changed = [a if a != "3" else "4" for a in arms_sweep["args"]]  # --seed 3 -> 4
    refused = run_main("tune.sweep", *changed[:changed.index("--arms")],
                       *changed[changed.index("--arms") + 2:])  # and CMG's arm alone
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    for words in ("exists with other settings", "--seed 3 -> 4",
                  "--arms mixed,single,noise,none -> mixed", "--resume", "--name"):
        assert words in refused.stderr, refused.stderr
    arm = run_main("tune.sweep", "--storage", "sweeps", "--name", "arms/arm-none", "--resume")
    assert arm.returncode == 2 and "is an arm of sweep arms" in arm.stderr, arm.stderr


def test_a_replicated_arm_runs_its_own_best_configuration(arms_sweep):
    experiment = arms_sweep["experiment"]
    proc = subprocess.run([sys.executable, "-m", "tune.replicate", str(experiment), "--top", "1",
                           "--seeds", "1", "--arms", "none", "--eval-limit", "64", "--quiet"],
                          cwd=arms_sweep["work"], env=_env(), capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((experiment / "summary.json").read_text())
    cmg_best, none_best = (summary["arms"][a]["best"] for a in ("mixed", "none"))
    df = load_replicates(experiment)
    runs = {arm: rows for arm, rows in df.groupby("arm")}
    assert set(runs) == {"mixed", "none"} and set(df["seed"]) == {4}
    assert set(runs["mixed"]["source_trial"]) == {cmg_best["trial_id"]}
    # the head-only arm at its own study's best (its lr, no CMG knob), filed under CMG's best
    assert set(runs["none"]["source_trial"]) == {none_best["trial_id"]} != {cmg_best["trial_id"]}
    assert set(runs["none"]["param_paired_with"]) == {cmg_best["trial_id"]}
    assert runs["none"]["param_lr"].tolist() == [none_best["params"]["lr"]]
    assert runs["none"]["param_sigma"].isna().all() and runs["mixed"]["param_sigma"].notna().all()
    # paired on one classifier per cell
    assert runs["none"]["stage1_key"].tolist() == runs["mixed"]["stage1_key"].tolist()
    assert f"lift vs {ARMS['none']}" in proc.stdout, proc.stdout
    # what tune.replicate would add again: nothing; with arm "single" too: its own best
    exp = Experiment.open(experiment)
    assert points_to_add(exp, chosen_runs(exp, 1, arms=("mixed", "none"))[1], [4]) == []
    single = json.loads((experiment / "arm-single" / "summary.json").read_text())["best"]
    added = points_to_add(exp, chosen_runs(exp, 1, arms=("mixed", "single"))[1], [4])
    assert [(p["arm"], p["source_trial"], p["paired_with"]) for p in added] == [
        ("single", single["trial_id"], cmg_best["trial_id"])]


VARIANT = "none + stage2.label_smoothing=0.3"  # a smoothing the smoke budget does not use


def test_a_variant_reruns_an_arms_cells_with_its_override(arms_sweep, monkeypatch):
    """`--arms none --variant stage2.label_smoothing=0.3` after the plain runs: the head-only arm's
    own best once more on the same cell and stage-1 models, under the override, recorded as its
    own arm; its lift in the table; nothing more to add after; bad overrides refused in one
    line."""
    experiment = arms_sweep["experiment"]
    args = [str(experiment), "--top", "1", "--seeds", "1", "--arms", "none", "--eval-limit", "64",
            "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "tune.replicate", *args,
                           "--variant", "stage2.label_smoothing=0.3"],
                          cwd=arms_sweep["work"], env=_env(), capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {arm: rows for arm, rows in load_replicates(experiment).groupby("arm")}
    assert set(runs) == {"mixed", "none", VARIANT}
    assert runs[VARIANT]["source_trial"].tolist() == runs["none"]["source_trial"].tolist()
    assert runs[VARIANT]["stage1_key"].tolist() == runs["mixed"]["stage1_key"].tolist()
    smoothing = {json.loads((t.parent / "params.json").read_text()).get("variant"):
                 json.loads(t.read_text())["config"]["stage2"]["label_smoothing"]
                 for t in (experiment / "replicate").glob("run-*/replicate-*/trial.json")}
    assert smoothing["stage2.label_smoothing=0.3"] == 0.3 and smoothing[None] != 0.3
    assert f"lift vs {ARMS['none']}, with stage2.label_smoothing=0.3" in proc.stdout, proc.stdout
    exp = Experiment.open(experiment)
    none_runs = chosen_runs(exp, 1, arms=("none",))[1]
    assert points_to_add(exp, none_runs, [4], "stage2.label_smoothing=0.3") == []
    spec = spec_from_manifest(json.loads((experiment / "manifest.json").read_text()))
    assert variant_of(["stage2.label_smoothing=.30"], spec) == "stage2.label_smoothing=0.3"
    assert len(points_to_add(exp, none_runs, [4], "stage2.label_smoothing=0.2")) == 1
    monkeypatch.chdir(arms_sweep["work"])  # in this process (refused before Ray starts)
    monkeypatch.syspath_prepend(str(arms_sweep["work"]))
    for override, words in (("stage2.lr=1e-3", "the sweep searched it"),
                            ("stage2.pseudo_ood=noise", "--arms names the arms"),
                            ("stage2.nope=1", "unknown setting key 'stage2.nope'"),
                            ("classifier.label_smoothing=0", "a variant changes stage 2 only")):
        refused = run_main("tune.replicate", *args, "--variant", override)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and words in refused.stderr


def test_runs_on_weights_the_store_no_longer_holds_count_as_missing(arms_sweep, tmp_path):
    """Every replicate row records the weights it ran on (`stage1_weights`), and a run whose
    classifier the store now holds with other bits (trained again on another machine: here the
    same model one ulp off, republished) is run again, so that a cell's arms share one
    classifier; a copy of the store, the shared one stays as it was."""
    import torch

    from tune.artifacts import ArtifactStore, Stage1Keys, file_digest

    experiment = arms_sweep["experiment"]
    exp, df = Experiment.open(experiment), load_replicates(experiment)
    store = ArtifactStore(str(shutil.copytree(experiment.parent / "stage1", tmp_path / "s1")))
    assert df["stage1_weights"].tolist() == [
        store.weights_id(Stage1Keys.parse(k)) for k in df["stage1_key"]]
    runs = chosen_runs(exp, 1, arms=("mixed", "none"))[1]
    assert points_to_add(exp, runs, [4], store=store) == []
    key = Stage1Keys.parse(df["stage1_key"].iloc[0]).classifier
    model = Path(store.root) / key / "classifier.pt"
    checkpoint = torch.load(model, weights_only=False)
    weight = next(t for t in checkpoint["model"].values() if t.is_floating_point())
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[:1], torch.tensor(1.0))[0]
    torch.save(checkpoint, model)
    meta = store.read_json(key)
    store.write_json(key, "meta.json", {**meta, "digests": {**meta["digests"],
                                                            "classifier.pt": file_digest(model)}})
    assert [(p["arm"], p["seed"]) for p in points_to_add(exp, runs, [4], store=store)] == [
        ("mixed", 4), ("none", 4)]
    assert points_to_add(exp, runs, [4]) == []  # without the store: what it ran stands


def test_a_cell_trained_again_in_other_bits_runs_its_earlier_arms_again(arms_sweep):
    """A fresh machine: the store lost, the head-only run of seed 4 never ran, and the cell's
    classifier finished there in other bits (its training resumed from a last-epoch checkpoint
    one ulp off). tune.replicate trains it and runs the head-only arm on it (first pass), then
    finds CMG's run of that cell on the old weights and runs it again (second pass): both arms
    end on one classifier. The variant of the head-only arm is left on the old weights, which
    a call for it then finds."""
    import torch

    from tune.artifacts import ArtifactStore, Stage1Keys

    experiment = arms_sweep["experiment"]
    df = load_replicates(experiment)
    plain = df[(df["seed"] == 4) & df["arm"].isin(["mixed", "none"])]
    old = set(plain["stage1_weights"])
    store = ArtifactStore(str(experiment.parent / "stage1"))
    key = Stage1Keys.parse(plain["stage1_key"].iloc[0]).classifier
    folder = Path(store.root) / key
    checkpoint = torch.load(folder / "classifier.pt", weights_only=False)
    weight = next(t for t in checkpoint["model"].values() if t.is_floating_point())
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[:1], torch.tensor(1.0))[0]
    shutil.rmtree(folder)
    (folder / "partial").mkdir(parents=True)
    torch.save(checkpoint, folder / "partial" / "classifier.pt")
    none_run = plain.loc[plain["arm"] == "none", "trial_id"].iloc[0]
    shutil.rmtree(next((experiment / "replicate").glob(f"run-*/replicate-*-{none_run}")))
    proc = subprocess.run([sys.executable, "-m", "tune.replicate", str(experiment), "--top", "1",
                           "--seeds", "1", "--arms", "none", "--eval-limit", "64"],
                          cwd=arms_sweep["work"], env=_env(), capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[replicate] 1 runs again: they ran on stage-1 models that this store has trained " \
        "again" in proc.stdout, proc.stdout
    assert "2 runs added" in proc.stdout
    df = load_replicates(experiment)
    now = df[(df["seed"] == 4) & df["arm"].isin(["mixed", "none"])]
    assert len(now) == 2 and now["trial_id"].isin(plain["trial_id"]).sum() == 0
    assert set(now["stage1_weights"]) == {store.weights_id(Stage1Keys.parse(
        now["stage1_key"].iloc[0]))} and not set(now["stage1_weights"]) & old
    exp = Experiment.open(experiment)
    assert len(points_to_add(exp, chosen_runs(exp, 1, arms=("none",))[1], [4],
                             "stage2.label_smoothing=0.3", store)) == 1


def test_arm_spaces_hold_only_the_knobs_that_act_on_each_arm():
    space = default_space(budget_config("smoke"))
    assert set(arm_space(space, "mixed")) == set(space)
    assert set(space) - set(arm_space(space, "single")) == {"mixing", "mask_prob", "num_mixed",
                                                            "distinct"}
    assert set(arm_space(space, "noise")) == {"energy_weight", "m_in_percentile",
                                             "m_out_percentile", "lr", "epochs", "ood_per_batch"}
    assert set(arm_space(space, "none")) == {"lr", "epochs"}
    assert all(arm_space(space, arm)[k] == p for arm in ARMS
               for k, p in space.items() if k in arm_space(space, arm))  # the same ranges


def test_the_arm_spec_changes_the_arm_its_name_space_and_first_point_only(tmp_path):
    spec = build_spec(["--storage", str(tmp_path), "--arms", "none,single", *SWEEP_SMOKE])[0]
    assert spec.arms == ("mixed", "single", "none") and spec.arm("mixed") == spec
    none = spec.arm("none")
    assert none.experiment == f"{spec.experiment}/arm-none"
    assert none.options.name == f"{spec.options.name}/arm-none" and none.arms == ("none",)
    assert none.options.seed == spec.options.seed and none.stage1_store == spec.stage1_store
    assert none.base.stage2.pseudo_ood == "none" and set(none.space) == {"lr", "epochs"}
    assert none.first == {"lr": spec.base.stage2.lr, "epochs": spec.base.stage2.epochs}
    default = build_spec(["--storage", str(tmp_path), *SWEEP_SMOKE])[0]
    assert default.options.arms is None and default.arms == ("mixed",)
    assert build_spec(["--storage", str(tmp_path), "--arms", "mixed", *SWEEP_SMOKE])[0] == default
    assert not tmp_path.joinpath("same_dataset_mnist-CMG-energy-smoke").exists()


@pytest.mark.parametrize("args, words", [
    (["--arms", "mixed,nois"], ["unknown arm 'nois'", "all"]),
    (["--arms", "all", "--set", "stage2.pseudo_ood=none"], ["--arms", "stage2.pseudo_ood"]),
])
def test_bad_arms_exit_2_and_write_nothing(tmp_path, args, words):
    assert_refused(tmp_path / "store", *args, words=words)


def test_an_experiment_folder_without_a_manifest_is_still_refused(tmp_path):
    (tmp_path / "store" / "taken").mkdir(parents=True)
    proc = run_main("tune.sweep", "--storage", str(tmp_path / "store"), "--name", "taken",
                    "--budget", "smoke")
    assert proc.returncode == 2 and "exists; pass --resume" in proc.stderr, proc.stderr
