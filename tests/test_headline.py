"""The headline table (analysis.headline) from a report folder: numbers by hand, the lifts paired
within (seed, partition), the README section between its markers, and refusals."""

from __future__ import annotations

import json
import re
import statistics

import pandas as pd
import pytest
from scipy import stats

from analysis.headline import (END, START, chosen_trials, headline_lifts, headline_markdown,
                               headline_table)
from cmg.results import BASELINES, REPLICATES_FILE
from conftest import ROOT, run_main

# (trial, seed, partition) -> CMG test AUROC; a baseline b is 0.01 * (its index + 1) below the
# tuned configuration's CMG; every FPR95 is 1 - AUROC
AUROC = {("a1", 1, 1): 0.96, ("a1", 1, 2): 0.90, ("a1", 2, 1): 0.98, ("a1", 2, 2): 0.94,
         ("d0", 1, 1): 0.95, ("d0", 1, 2): 0.91, ("d0", 2, 1): 0.93, ("d0", 2, 2): 0.92}


def _report(folder):
    rows = []
    for (trial, seed, partition), a in AUROC.items():
        tuned = AUROC[("a1", seed, partition)]  # both run on the same stage-1 models
        rows.append({"source_trial": trial, "seed": seed, "partition": partition,
                     "test_auroc": a, "test_fpr95": 1 - a,
                     **{f"{b}_test_{m}": (tuned - 0.01 * (k + 1) if m == "auroc"
                                          else 1 - tuned + 0.01 * (k + 1))
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
    return folder


def test_headline_numbers_by_hand(tmp_path):
    df = pd.read_csv(_report(tmp_path) / REPLICATES_FILE)
    table = headline_table(df, "a1", "d0").set_index("partition")
    assert list(table.index) == [1, 2, "mean"]
    assert table.loc[1, "CMG, tuned auroc"] == pytest.approx((0.96 + 0.98) / 2)
    assert table.loc[2, "CMG, first trial fpr95"] == pytest.approx(1 - (0.91 + 0.92) / 2)
    assert table.loc[1, "max-softmax auroc"] == pytest.approx((0.96 + 0.98) / 2 - 0.01)
    seed_means = [(0.96 + 0.90) / 2, (0.98 + 0.94) / 2]
    half = stats.t.ppf(0.975, 1) * statistics.stdev(seed_means) / 2 ** 0.5
    assert table.loc["mean", "CMG, tuned auroc"] == pytest.approx(statistics.fmean(seed_means))
    assert table.loc["mean", "CMG, tuned auroc_ci_low"] == pytest.approx(
        statistics.fmean(seed_means) - half)
    assert table.loc["mean", "seeds"] == 2

    lifts = headline_lifts(df, "a1", "d0").set_index("over")
    assert lifts.loc["max-logit", "mean"] == pytest.approx(0.01 * 3)  # the third baseline
    # over the defaults, paired: seed 1 lifts 0.01 and -0.01, seed 2 lifts 0.05 and 0.02
    paired = [statistics.fmean([0.01, -0.01]), statistics.fmean([0.05, 0.02])]
    assert lifts.loc["CMG, first trial", "mean"] == pytest.approx(statistics.fmean(paired))
    half = stats.t.ppf(0.975, 1) * statistics.stdev(paired) / 2 ** 0.5
    assert lifts.loc["CMG, first trial", "ci_high"] == pytest.approx(statistics.fmean(paired) + half)


def test_the_readme_section_is_written_between_its_markers(tmp_path):
    report = _report(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{START}\nold table\n{END}\n\nAfter.\n")
    proc = run_main("analysis.headline", str(report), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{END}\n\nAfter.\n")
    assert proc.stdout.strip() in text
    # the table: the chosen trials named, the mean row with its interval, a lift per score
    assert "tuned = trial `a1`, first trial = `d0`" in text
    assert re.search(r"\| \*\*mean\*\* +\| 0\.9450 \[0\.\d{4}, 1\.\d{4}\] / 0\.055 \|", text)
    assert text.count("| +0.0") + text.count("| -0.0") == len(BASELINES) + 1


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
    """The README's table is analysis.headline of results/mnist-quick, whose tuned configuration
    is the one its report selected on validation, replicated on new seeds only."""
    report = ROOT / "results" / "mnist-quick"
    readme = (ROOT / "README.md").read_text()
    assert readme.split(START + "\n")[1].split("\n" + END)[0] == headline_markdown(report)
    summary = pd.read_csv(report / "summary.csv")
    complete = summary[summary["status"] == "complete"]
    tuned, defaults = chosen_trials(summary)
    assert tuned == complete.loc[complete["val_auroc_mean"].idxmax(), "trial_id"]
    assert defaults == summary.loc[summary["trial_number"].idxmin(), "trial_id"]
    assert f"Trial `{tuned}`, selected on mean val_auroc" in (report / "report.md").read_text()
    replicates = pd.read_csv(report / REPLICATES_FILE)
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["options"]["num_samples"] == len(summary) >= 24
    assert manifest["options"]["seed"] not in set(replicates["seed"])
    for trial in (tuned, defaults):
        runs = replicates[replicates["source_trial"] == trial]
        assert sorted(set(runs["seed"])) == [1, 2, 3] and len(runs) == 3 * 5
    # the verdict's numbers: the per-seed lifts over max-logit, and CMG above it on every pair
    runs = replicates[replicates["source_trial"] == tuned]
    lifts = (runs["test_auroc"] - runs["maxlogit_test_auroc"]).groupby(runs["seed"]).mean()
    assert f"({', '.join(f'{v:+.4f}' for v in lifts)})" in " ".join(readme.split())
    assert (runs["test_auroc"] > runs["maxlogit_test_auroc"]).all()
