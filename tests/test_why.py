"""results/why.py, the measurements behind the README's "why" sentences, on a real sweep: its
max-logit AUROC of the real OOD test images is the sweep's own (recomputed with scikit-learn from
the trial's saved scores), and on a machine whose stage-1 store lacks models (a headline continued
from its packed records) it trains those, the prewarm's way, and measures the same numbers (but
the rank correlation where a trial's scores are gone)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis.headline import chosen_trials
from analysis.trial_files import load_scores, load_trial_record
from cmg.config import RunConfig
from conftest import ROOT
from tune.artifacts import stage1_keys


def why(experiment: Path, *trials: str, tmp: Path) -> tuple[list[dict], str]:
    """results/why.py's rows and stderr (64 pseudo-OOD images), its models trained here cached
    under TMP."""
    proc = subprocess.run([sys.executable, str(ROOT / "results/why.py"), str(experiment),
                           *trials, "--pseudo-images", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_why_measures_the_sweeps_own_models_and_trains_those_its_store_lost(second_sweep,
                                                                            tmp_path):
    experiment = second_sweep["experiment"]
    summary = pd.read_csv(experiment / "report" / "summary.csv", dtype={"trial_id": str})
    tuned, defaults = chosen_trials(summary)  # what the headline names, and why.py by default
    assert tuned != defaults
    cache = tmp_path / "cache"
    cache.mkdir()
    rows, stderr = why(experiment, tmp=cache)
    assert "[why]" not in stderr  # every model came from the sweep's store
    assert [row["partition"] for row in rows] == [1, 2, 3, 4, 5]
    test = load_scores(str(experiment), tuned).query("split == 'test'")
    for row in rows:
        part = test[test["partition"] == row["partition"]]
        assert row["real_auroc"] == pytest.approx(
            roc_auc_score(part["kind"] != "ind", part["maxlogit"]), abs=1e-6)
        for name in ("tuned", "defaults"):
            assert 0.0 <= row[f"{name}_pseudo_auroc"] <= 1.0
            assert -1.0 <= row[f"{name}_spearman_vs_maxlogit"] <= 1.0

    # the records elsewhere, their stage-1 store without partition 3's models: those two are
    # trained here, once (the others are the sweep's, linked)
    moved, lost = tmp_path / "records", tmp_path / "lost"
    shutil.copytree(experiment, moved)
    record = load_trial_record(str(experiment), tuned)
    gone = stage1_keys(record["setting"], 3, RunConfig.from_dict(record["config"]))
    lost.mkdir()
    for key in Path(record["stage1_store"]).iterdir():
        if key.name not in gone:
            (lost / key.name).symlink_to(key)
    for path in moved.glob("trial-*/trial.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "stage1_store": str(lost)}))
    # and, as of a first trial stopped early, the other trial's scores of partition 3 are gone
    next(moved.glob(f"trial-*-{defaults}")).joinpath("scores", "partition-3.parquet").unlink()
    again, stderr = why(moved, tuned, defaults, tmp=cache)
    assert stderr.count("does not hold") == 2  # partition 3's classifier and CVAE (one latent size)
    assert all(f"does not hold {key}" in stderr for key in gone)
    assert f"defaults trial {defaults} has no saved scores of partitions [3]" in stderr
    assert [r.keys() for r in again] == [r.keys() for r in rows]
    assert again[2]["defaults_spearman_vs_maxlogit"] is None
    rows[2]["defaults_spearman_vs_maxlogit"] = None
    for row, same in zip(rows, again):
        assert same == pytest.approx(row, abs=1e-6)
    _, stderr = why(moved, tuned, defaults, tmp=cache)
    assert "does not hold" not in stderr  # trained once per machine
