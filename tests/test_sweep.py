"""The sweep on a real local Ray with real Optuna storage, on real MNIST (smoke budget)."""

import json
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from analysis.trials import trial_rows
from conftest import assert_refused, run_sweep
from tune.artifacts import ArtifactStore, Stage1Keys


def trials(experiment: Path) -> list[dict]:
    out = []
    for folder in sorted(experiment.glob("trial-*")):
        if not (folder / "params.json").exists():  # a trial folder being created
            continue
        out.append({"folder": folder, "rows": trial_rows(folder),  # the full rows
                    "params": json.loads((folder / "params.json").read_text()),
                    "error": (folder / "error.txt").read_text()
                    if (folder / "error.txt").exists() else None})
    return out


def study(experiment: Path, name: str):
    storage = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_every_trial_reports_partitions_in_order_and_the_best_has_five(smoke_sweep):
    summary = json.loads((smoke_sweep["experiment"] / "summary.json").read_text())
    found = trials(smoke_sweep["experiment"])
    assert len(found) == summary["trials"]["total"] == 5
    for t in found:
        assert [r["partition"] for r in t["rows"]] == [1, 2, 3, 4, 5][:len(t["rows"])]
        assert [r["partitions_done"] for r in t["rows"]] == list(range(1, len(t["rows"]) + 1))
    complete = [t for t in found if len(t["rows"]) == 5]
    assert len(complete) == summary["trials"]["complete"] >= 1
    for t in complete:  # the final report holds mean and std over the five partitions
        last = t["rows"][-1]
        values = [r["val_auroc"] for r in t["rows"]]
        assert last["val_auroc_mean"] == pytest.approx(sum(values) / 5)
        assert {"test_auroc_std", "msp_test_auroc_mean", "energy_val_fpr95_mean",
                "maxlogit_test_auroc_mean"} <= set(last)
    assert summary["best"]["metrics"]["val_auroc_mean"] == max(
        t["rows"][-1]["val_auroc_mean"] for t in complete)
    assert "best configuration" in smoke_sweep["stdout"]
    assert "max-logit" in smoke_sweep["stdout"]
    assert "maxlogit_test_auroc_mean" in summary["best"]["metrics"]


def test_the_prewarm_trains_every_reachable_stage1_model_once_before_the_trials(smoke_sweep):
    summary = json.loads((smoke_sweep["experiment"] / "summary.json").read_text())
    store = ArtifactStore(str(smoke_sweep["storage"] / "stage1"))
    keys = smoke_sweep["stage1_keys"]  # the store's models right after the sweep
    rows = [r for t in trials(smoke_sweep["experiment"]) for r in t["rows"]]
    assert {k for r in rows for k in Stage1Keys.parse(r["stage1_key"])} <= set(keys)
    # one classifier per partition, one CVAE per (latent size, partition): split keys
    kinds = [store.read_json(k)["kind"] for k in keys]
    assert (kinds.count("classifier"), kinds.count("cvae")) == (5, 10)
    assert summary["stage1_trained_by_kind"] == {"classifier": 5, "cvae": 10}
    # the store's own log of trainings: every model in the fresh store was trained exactly once,
    # by a prewarm task of this sweep, none by a trial (they found every model they needed)
    trainings = {k: [t["owner"] for t in store.trainings(k)] for k in keys}
    assert all(len(owners) == 1 and owners[0].startswith("smoke/prewarm-")
               for owners in trainings.values()), trainings
    assert all(r["stage1_trained"] == 0 for r in rows)
    assert summary["stage1_reused"] == len(rows)
    assert "15 trained (5 classifiers, 10 CVAEs)" in smoke_sweep["stdout"]
    # the times a user sets beside another machine's: the models' training, summed, and the search
    seconds = summary["seconds"]
    assert seconds["stage1_training"] > 0 and seconds["search"] > 0
    assert f"times: search {seconds['search']:.0f} s; stage-1 training " in smoke_sweep["stdout"]


def test_a_diverging_config_errors_while_the_others_finish(smoke_sweep):
    found = trials(smoke_sweep["experiment"])
    diverged = [t for t in found if t["params"]["lr"] > 1]
    healthy = [t for t in found if t["params"]["lr"] < 1]
    assert diverged and healthy
    for t in diverged:
        assert "TrainingDiverged" in t["error"] and "stage-2 loss became" in t["error"]
    assert all(t["error"] is None and t["rows"] for t in healthy)


def test_study_is_persisted_and_starts_from_the_reference_defaults(smoke_sweep):
    s = study(smoke_sweep["experiment"], "smoke")
    assert len(s.trials) == 5 and not [t for t in s.trials if t.state == TrialState.RUNNING]
    first = s.trials[0].params
    assert first["sigma"] == 3.0 and first["mixing"] == "mask" and first["mask_prob"] == 0.5
    assert first["m_in_percentile"] == 20.0 and first["energy_weight"] == 0.1
    assert sum(t.state == TrialState.FAIL for t in s.trials) == sum(
        t["error"] is not None for t in trials(smoke_sweep["experiment"]))


def test_a_second_sweep_in_the_same_storage_trains_no_stage1(second_sweep, smoke_sweep):
    """Selected blind (--select-on rotated): the same stage-1 models, their features for the
    rotated validation OOD beside the others, and a report that says what selection saw."""
    summary = json.loads((second_sweep["experiment"] / "summary.json").read_text())
    stage1 = smoke_sweep["storage"] / "stage1"
    assert all(len(list(d.glob("features*.pt"))) == 2 for d in stage1.glob("*-classifier-*")
               if (d / "meta.json").read_text().count('"seed": 3'))
    report = (second_sweep["experiment"] / "report" / "report.md").read_text()
    assert "blind to the unseen classes (`--select-on rotated`)" in report
    assert summary["stage1_trained"] == 0 and summary["stage1_reused"] == 10
    assert summary["seconds"]["stage1_training"] == 0  # nothing trained, nothing timed
    assert "0 trained (0 classifiers, 0 CVAEs), reused in 10 trial partitions" in second_sweep[
        "stdout"]


def test_asha_stops_are_pruned_in_the_study_with_their_last_mean(smoke_sweep):
    experiment = smoke_sweep["experiment"]
    study_trials = study(experiment, "smoke").trials
    summary = json.loads((experiment / "summary.json").read_text())
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    for folder in experiment.glob("trial-*"):
        params = json.loads((folder / "params.json").read_text())
        trial, = [t for t in study_trials if all(params[k] == v for k, v in t.params.items())]
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()
                if line.strip()] if (folder / "result.json").exists() else []
        if (folder / "error.txt").exists():
            assert trial.state == TrialState.FAIL and "errored" in trial.system_attrs["fail_reason"]
            counts["failed"] += 1
        elif len(rows) < 5:
            assert trial.state == TrialState.PRUNED
            assert trial.value == pytest.approx(rows[-1]["val_auroc_mean"])
            counts["pruned"] += 1
        else:
            assert trial.state == TrialState.COMPLETE
            assert trial.value == pytest.approx(rows[-1]["val_auroc_mean"])
            counts["complete"] += 1
    assert counts["pruned"] >= 1
    assert summary["trials"] == {"total": 5, **counts}
    assert f"{counts['pruned']} pruned" in smoke_sweep["stdout"]


@pytest.mark.parametrize("args, words", [
    (["--setting", "nope"], ["unknown setting"]),
    (["--mode", "CMG-x"], ["unknown mode", "both"]),
    (["--resume"], ["no sweep to resume"]),
    (["--space", "MISSING.yaml"], ["cannot read space file"]),
    (["--space", "bad.yaml"], ["not valid YAML", "line"]),
    (["--space", "unknown.yaml"], ["unknown parameter 'sigmaa'"]),
    (["--space", "range.yaml"], ["'sigma'", "low <= high"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, words):
    (tmp_path / "bad.yaml").write_text("sigma: [1, 2\n")
    (tmp_path / "unknown.yaml").write_text("sigmaa: 3\n")
    (tmp_path / "range.yaml").write_text("sigma: {low: 4, high: 1}\n")
    args = [a if not a.endswith(".yaml") else str(tmp_path / a) for a in args]
    assert_refused(tmp_path / "store", *args, words=words)


def test_existing_experiment_needs_resume(smoke_sweep):
    proc = run_sweep("--storage", str(smoke_sweep["storage"]), "--name", "smoke", "--budget",
                     "smoke", timeout=120)
    assert proc.returncode == 2 and "--resume" in proc.stderr
