"""The headline (analysis.headline) from report folders: numbers by hand (scores, intervals over
seeds, lifts paired within (seed, partition), their t-tests and Holm's adjustment over every
selection), a column per selection, the control arms, verdicts that say "does not", the README
section between its markers, and refusals."""

from __future__ import annotations

import json
import re
import statistics

import pandas as pd
import pytest
from scipy import stats

from analysis.headline import (DEFAULTS, END, QUESTIONS, START, TUNED, chosen_trials, headline,
                               headline_markdown, lift, score_cells, score_summary)
from analysis.replicates import holm
from cmg.results import ARMS, BASELINES, REPLICATES_FILE
from conftest import ROOT, run_main

# (trial, arm, seed, partition) -> test AUROC; a baseline b is 0.01 * (its index + 1) + 0.002 *
# seed below the tuned configuration's CMG in the same cell; every FPR95 is 1 - AUROC
AUROC = {("a1", "mixed", 1, 1): 0.96, ("a1", "mixed", 1, 2): 0.90,
         ("a1", "mixed", 2, 1): 0.98, ("a1", "mixed", 2, 2): 0.94,
         ("a1", "single", 1, 1): 0.95, ("a1", "single", 1, 2): 0.91,
         ("a1", "single", 2, 1): 0.97, ("a1", "single", 2, 2): 0.93,
         ("a1", "none", 1, 1): 0.90, ("a1", "none", 1, 2): 0.86,
         ("a1", "none", 2, 1): 0.93, ("a1", "none", 2, 2): 0.90,
         ("d0", "mixed", 1, 1): 0.95, ("d0", "mixed", 1, 2): 0.91,
         ("d0", "mixed", 2, 1): 0.93, ("d0", "mixed", 2, 2): 0.92}


def _report(folder, val_ood: str = "unseen", shift: float = 0.0):
    """A report folder of a replicated sweep: tuned a1 with two control arms, defaults d0."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for (trial, arm, seed, partition), a in AUROC.items():
        tuned = AUROC[("a1", "mixed", seed, partition)] + shift
        a = a + shift if (trial, arm) == ("a1", "mixed") else a
        rows.append({"source_trial": trial, "arm": arm, "seed": seed, "partition": partition,
                     "test_auroc": a, "test_fpr95": 1 - a,
                     **{f"{b}_test_{m}": (tuned - 0.01 * (k + 1) - 0.002 * seed if m == "auroc"
                                          else 1 - tuned + 0.01 * (k + 1) + 0.002 * seed)
                        for k, b in enumerate(BASELINES) for m in ("auroc", "fpr95")}})
    pd.DataFrame(rows).to_csv(folder / REPLICATES_FILE, index=False)
    # d0 is the first trial (the defaults); a1 the best complete one on validation; c2 is
    # better on validation but incomplete, so never chosen
    pd.DataFrame([{"trial_id": "d0", "trial_number": 1, "status": "complete",
                   "val_auroc_mean": 0.90},
                  {"trial_id": "a1", "trial_number": 2, "status": "complete",
                   "val_auroc_mean": 0.95},
                  {"trial_id": "c2", "trial_number": 3, "status": "incomplete",
                   "val_auroc_mean": 0.99}]).to_csv(folder / "summary.csv", index=False)
    pd.DataFrame([{"trial_id": "a1", "partition": p, "test_auroc": 0.97 + 0.01 * p}
                  for p in (1, 2)]).to_parquet(folder / "trials.parquet")
    (folder / "manifest.json").write_text(json.dumps({"run_config": {"data": {
        "val_ood": val_ood}}}))
    return folder


def test_headline_numbers_by_hand(tmp_path):
    df = pd.read_csv(_report(tmp_path) / REPLICATES_FILE)
    cells = score_cells(df, "a1", "d0")
    assert list(cells) == [TUNED, ARMS["single"], ARMS["none"], DEFAULTS, *BASELINES.values()]
    tuned = score_summary(cells[TUNED])
    seed_means = [(0.96 + 0.90) / 2, (0.98 + 0.94) / 2]
    half = stats.t.ppf(0.975, 1) * statistics.stdev(seed_means) / 2 ** 0.5
    assert tuned["auroc"] == pytest.approx(statistics.fmean(seed_means))
    assert tuned["ci_low"] == pytest.approx(statistics.fmean(seed_means) - half)
    assert score_summary(cells[DEFAULTS])["fpr95"] == pytest.approx(
        1 - statistics.fmean([0.95, 0.91, 0.93, 0.92]))
    assert score_summary(cells["max-softmax"])["auroc"] == pytest.approx(tuned["auroc"] - 0.013)
    # over head re-training only, paired: seed 1 lifts 0.06 and 0.04, seed 2 0.05 and 0.04
    paired = [statistics.fmean([0.06, 0.04]), statistics.fmean([0.05, 0.04])]
    over = lift(cells[TUNED], cells[ARMS["none"]])
    assert over["mean"] == pytest.approx(statistics.fmean(paired))
    assert over["ci_high"] == pytest.approx(
        statistics.fmean(paired) + stats.t.ppf(0.975, 1) * statistics.stdev(paired) / 2 ** 0.5)
    assert over["p"] == pytest.approx(stats.ttest_1samp(paired, 0.0).pvalue)
    assert lift(cells[TUNED], cells["max-logit"])["mean"] == pytest.approx(0.033)


def test_two_selections_share_one_holm_family(tmp_path):
    unseen, blind = _report(tmp_path / "u"), _report(tmp_path / "b", "rotated", shift=-0.02)
    result = headline([unseen, blind])
    runs = result["reports"]
    assert [r["selection"] for r in runs] == ["unseen", "rotated"]
    assert result["family"] == 2 * len(QUESTIONS)  # every question run under both selections
    ps = [one["p"] for r in runs for one in r["lifts"].values()]
    assert [one["p_holm"] for r in runs for one in r["lifts"].values()] == pytest.approx(holm(ps))
    assert runs[0]["selection_seed"] == pytest.approx(0.985)  # apart: in no lift
    text = headline_markdown([unseen, blind])
    header = text.split("\n")[2]
    assert "selected on held-out images of the unseen classes, trial `a1`" in header
    assert "selected blind (rotated IND validation images), trial `a1`" in header
    # blind: CMG 0.02 lower, below the unmixed arm on every cell: the verdict says so,
    # or "does not" when Holm does not show it; never "yes"
    mixing = next(line for line in text.splitlines() if line.startswith("- **Does class mixing"))
    assert mixing.count("selected") == 2 and "yes" not in mixing


def test_the_readme_section_is_written_between_its_markers(tmp_path):
    report = _report(tmp_path / "r")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{START}\nold table\n{END}\n\nAfter.\n")
    proc = run_main("analysis.headline", str(report), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{END}\n\nAfter.\n")
    assert proc.stdout.strip() in text
    assert "the first trial is `d0`" in text
    assert re.search(r"\| CMG, tuned +\| 0\.9450 \[0\.\d{4}, 1\.\d{4}\] / 0\.055 +\|", text)
    assert text.count("\n- **") == len(QUESTIONS)  # one verdict per question (all were run)


def test_refusals_name_the_fix(tmp_path):
    proc = run_main("analysis.headline", str(tmp_path))
    assert proc.returncode == 2 and "python -m tune.replicate" in proc.stderr
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    proc = run_main("analysis.headline", str(_report(tmp_path)), "--readme", str(readme))
    assert proc.returncode == 2 and "headline markers" in proc.stderr
    assert readme.read_text() == "no markers\n"
    pd.DataFrame([{"trial_id": "d0", "trial_number": 1, "status": "incomplete",
                   "val_auroc_mean": 0.9}]).to_csv(tmp_path / "summary.csv", index=False)
    proc = run_main("analysis.headline", str(tmp_path))
    assert proc.returncode == 2 and "no complete configuration" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_readme_results_are_the_committed_reports():
    """The README's table is analysis.headline of the two committed reports (selected on unseen
    classes; blind), each tuned configuration the one its report selected on validation, and
    every row of it 5 new seeds x 5 partitions, each (seed, partition) cell with its own stage-1
    classifier, the same one under every arm and both selections (the lifts are paired)."""
    reports = [ROOT / "results" / name for name in ("mnist-quick-unseen", "mnist-quick-blind")]
    readme = (ROOT / "README.md").read_text()
    assert readme.split(START + "\n")[1].split("\n" + END)[0] == headline_markdown(reports)
    classifier_of_cell = {}
    for report, val_ood in zip(reports, ("unseen", "rotated")):
        summary = pd.read_csv(report / "summary.csv")
        complete = summary[summary["status"] == "complete"]
        tuned, defaults = chosen_trials(summary)
        assert tuned == complete.loc[complete["val_auroc_mean"].idxmax(), "trial_id"]
        assert defaults == summary.loc[summary["trial_number"].idxmin(), "trial_id"]
        assert f"Trial `{tuned}`, selected on mean val_auroc" in (report / "report.md").read_text()
        manifest = json.loads((report / "manifest.json").read_text())
        assert manifest["run_config"]["data"]["val_ood"] == val_ood
        assert manifest["options"]["num_samples"] == len(summary) >= 24
        replicates = pd.read_csv(report / REPLICATES_FILE)
        assert manifest["options"]["seed"] not in set(replicates["seed"])
        for trial in (tuned, defaults):
            runs = replicates[replicates["source_trial"] == trial]
            assert set(runs["arm"]) == set(ARMS)
            for _, cells in runs.groupby("arm"):
                assert sorted(set(cells["seed"])) == [1, 2, 3, 4, 5]
                assert len(cells) == len(cells.groupby(["seed", "partition"])) == 5 * 5
            for cell, keys in runs.groupby(["seed", "partition"])["stage1_key"]:
                classifier_of_cell.setdefault(cell, set()).update(
                    key.split("+")[0] for key in keys)
    assert len(classifier_of_cell) == 25
    assert all(len(keys) == 1 for keys in classifier_of_cell.values())
    assert len(set.union(*classifier_of_cell.values())) == 25
