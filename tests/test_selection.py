"""Selection transparency: the leave-one-OOD-set-out table and the report's note on what the
validation OOD data is."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.report import selection_note
from analysis.trials import leave_one_set_out
from cmg.results import BASELINES


def _table() -> pd.DataFrame:
    """Three complete configurations on OOD sets A, B, C (made-up numbers): `a` wins on the
    mean of all sets only because of its validation AUROC on A."""
    val = {"a": (0.99, 0.70, 0.70), "b": (0.60, 0.80, 0.85), "c": (0.80, 0.90, 0.60)}
    rows = []
    for k, (trial, v) in enumerate(val.items()):
        row = {"trial_id": trial, "n_partitions": 1, "partitions_total": 1,
               "val_auroc_mean": sum(v) / 3}
        for name, value in zip("ABC", v):
            row[f"val_{name}_auroc_mean"] = value
            row[f"test_{name}_auroc_mean"] = value - 0.01 * (k + 1)
            row.update({f"{b}_test_{name}_auroc_mean": 0.5 + 0.1 * j
                        for j, b in enumerate(BASELINES)})
        rows.append(row)
    rows.append({**rows[0], "trial_id": "stopped", "n_partitions": 0,  # never chosen
                 "val_A_auroc_mean": 1.0, "val_B_auroc_mean": 1.0, "val_C_auroc_mean": 1.0})
    return pd.DataFrame(rows)


def test_leave_one_set_out_chooses_on_the_other_sets():
    loso = leave_one_set_out(_table(), ["A", "B", "C"]).set_index("held-out OOD set")
    # without A: b (0.825) beats c (0.75) and a (0.70); without B: a (0.845); without C: c (0.85)
    assert loso["chosen without it"].to_dict() == {"A": "b", "B": "a", "C": "c"}
    assert loso.loc["A", "test AUROC (chosen without it)"] == pytest.approx(0.60 - 0.02)
    assert loso.loc["C", "test AUROC (chosen without it)"] == pytest.approx(0.60 - 0.03)
    assert set(loso["chosen on all sets"]) == {"a"}  # 0.797 > 0.767 (c) > 0.75 (b)
    assert loso.loc["A", "test AUROC (chosen on all sets)"] == pytest.approx(0.99 - 0.01)
    assert loso.loc["B", "max-logit"] == pytest.approx(0.7)
    assert leave_one_set_out(_table(), ["A"]).empty  # one set: nothing to hold out


def test_the_report_says_what_validation_ood_is():
    setting1 = selection_note(pd.DataFrame({"val_auroc": [0.9]}))
    setting2 = selection_note(pd.DataFrame({"val_SVHN_auroc": [0.9]}))
    assert "held-out *training* images of the same OOD classes" in setting1
    assert "20% of each OOD data set" in setting2 and "leave-one-set-out" in setting2
