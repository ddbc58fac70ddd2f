"""The headline (analysis.headline) from report folders: numbers by hand (scores, intervals over
seeds, lifts paired within (seed, partition), their t-tests and Holm's adjustment over every
selection; the exact sign-flip p, the detectable effect and the equivalence bound), a column per
selection, the control arms at their own tuned configurations or at CMG's, verdicts that say "does
not" with a bound, configurations on an edge of the range, the README section between its
markers, and refusals."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.headline import (END, QUESTIONS, START, arm_configurations, chosen_trials,
                               headline, headline_markdown, labels, lift, score_cells,
                               score_summary)
from analysis.replicates import (detectable_effect, equivalence_bound, holm, min_sign_flip_p,
                                 replicate_table, seeds_for_exact, sign_flip_p)
from cmg.config import budget_config
from cmg.results import ARMS, BASELINES, REPLICATES_FILE
from conftest import ROOT, run_main
from tune.space import default_space

# (trial, arm, seed, partition) -> test AUROC; a baseline b is 0.01 * (its index + 1) + 0.002 *
# seed below the tuned configuration's CMG in the same cell; every FPR95 is 1 - AUROC
AUROC = {("a1", "mixed", 1, 1): 0.96, ("a1", "mixed", 1, 2): 0.90,
         ("a1", "mixed", 2, 1): 0.98, ("a1", "mixed", 2, 2): 0.94,
         ("a1", "single", 1, 1): 0.95, ("a1", "single", 1, 2): 0.91,
         ("a1", "single", 2, 1): 0.97, ("a1", "single", 2, 2): 0.93,
         ("a1", "noise", 1, 1): 0.94, ("a1", "noise", 1, 2): 0.90,
         ("a1", "noise", 2, 1): 0.95, ("a1", "noise", 2, 2): 0.92,
         ("a1", "none", 1, 1): 0.90, ("a1", "none", 1, 2): 0.86,
         ("a1", "none", 2, 1): 0.93, ("a1", "none", 2, 2): 0.90,
         ("d0", "mixed", 1, 1): 0.95, ("d0", "mixed", 1, 2): 0.91,
         ("d0", "mixed", 2, 1): 0.93, ("d0", "mixed", 2, 2): 0.92}


# the knobs each configuration ran (param_* columns of replicates.csv): a1's lr is 2% of the
# default space's three decades above 1e-6, on its low edge; d0 holds the first trial's
PARAMS = {"a1": {"lr": 1.1552e-6, "sigma": 2.0, "mask_prob": 0.5},
          "d0": {"lr": 1e-4, "sigma": 3.0, "mask_prob": 0.5}}


def _report(folder, val_ood: str = "unseen", shift: float = 0.0, auroc: dict = AUROC,
            params: dict = PARAMS):
    """A report folder of a replicated sweep: tuned a1 with three control arms, defaults d0,
    its manifest recording the quick budget's default space."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for (trial, arm, seed, partition), a in auroc.items():
        tuned = AUROC[("a1", "mixed", seed, partition)] + shift
        a = a + shift if (trial, arm) == ("a1", "mixed") else a
        rows.append({"source_trial": trial, "arm": arm, "seed": seed, "partition": partition,
                     "test_auroc": a, "test_fpr95": 1 - a,
                     **{f"param_{k}": v for k, v in params.get(trial, {}).items()},
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
    space = {n: dataclasses.asdict(p) for n, p in default_space(budget_config("quick")).items()}
    (folder / "manifest.json").write_text(json.dumps({"run_config": {"data": {
        "val_ood": val_ood}}, "space": space}))
    return folder


def test_headline_numbers_by_hand(tmp_path):
    df = pd.read_csv(_report(tmp_path) / REPLICATES_FILE, dtype={"source_trial": str})
    arms = arm_configurations(df, "a1", "d0")
    assert arms == {"single": ("a1", False), "noise": ("a1", False), "none": ("a1", False)}
    cells = score_cells(df, "a1", "d0", arms)
    assert list(cells) == ["mixed", "single", "noise", "none", "defaults", *BASELINES]
    assert labels(arms)["none"] == f"{ARMS['none']}, at tuned CMG's knobs"
    tuned = score_summary(cells["mixed"])
    seed_means = [(0.96 + 0.90) / 2, (0.98 + 0.94) / 2]
    half = stats.t.ppf(0.975, 1) * statistics.stdev(seed_means) / 2 ** 0.5
    assert tuned["auroc"] == pytest.approx(statistics.fmean(seed_means))
    assert tuned["ci_low"] == pytest.approx(statistics.fmean(seed_means) - half)
    assert score_summary(cells["defaults"])["fpr95"] == pytest.approx(
        1 - statistics.fmean([0.95, 0.91, 0.93, 0.92]))
    assert score_summary(cells["msp"])["auroc"] == pytest.approx(tuned["auroc"] - 0.013)
    # over head re-training only, paired: seed 1 lifts 0.06 and 0.04, seed 2 0.05 and 0.04
    paired = [statistics.fmean([0.06, 0.04]), statistics.fmean([0.05, 0.04])]
    over = lift(cells["mixed"], cells["none"])
    assert over["mean"] == pytest.approx(statistics.fmean(paired))
    assert over["ci_high"] == pytest.approx(
        statistics.fmean(paired) + stats.t.ppf(0.975, 1) * statistics.stdev(paired) / 2 ** 0.5)
    assert over["p"] == pytest.approx(stats.ttest_1samp(paired, 0.0).pvalue)
    # both seed lifts positive: 2 of the 4 sign assignments reach |0.05 + 0.045|
    assert over["p_exact"] == 0.5 and over["n"] == 2
    assert over["sd"] == pytest.approx(statistics.stdev(paired))
    assert over["upper"] == pytest.approx(stats.t.interval(
        0.90, 1, loc=statistics.fmean(paired), scale=stats.sem(paired))[1])
    assert lift(cells["mixed"], cells["maxlogit"])["mean"] == pytest.approx(0.033)


def test_the_exact_sign_flip_p_by_hand():
    # seed lifts 3, 1, 2, -1 (sum 5): of the 16 sign assignments, |sum| >= 5 for +-(3+1+2+1) = 7,
    # +-(3+1+2-1) = 5 and +-(3-1+2+1) = 5: 6 of 16
    assert sign_flip_p([3.0, 1.0, 2.0, -1.0]) == 6 / 16
    # all one sign: only it and its mirror image reach the sum, the floor 2 / 2^n
    assert sign_flip_p([0.4, 0.1, 0.3, 0.2, 0.5]) == min_sign_flip_p(5) == 2 / 32 == 0.0625
    assert sign_flip_p([1.0, -1.0]) == 1.0  # the sum 0: every assignment reaches it
    # 2 / 2^n <= 0.05 / m: 8 questions need 9 seeds, 4 need 8, one 6
    assert [seeds_for_exact(0.05 / m) for m in (8, 10, 4, 1)] == [9, 9, 8, 6]


def test_the_detectable_effect_has_the_power_it_claims():
    """80% power, two-sided, at Holm's strictest step: by scipy's noncentral t, by simulation,
    and, for many seeds, the normal approximation."""
    sd, n, alpha = 0.00034, 5, 0.05 / 8
    effect = detectable_effect(sd, n, alpha)
    crit, nc = stats.t.ppf(1 - alpha / 2, n - 1), effect * n ** 0.5 / sd
    assert stats.nct.sf(crit, n - 1, nc) == pytest.approx(0.8, abs=1e-6)
    assert effect == pytest.approx(0.00101, abs=1e-5)  # the 0.0010 (unseen) ...
    assert detectable_effect(0.00060, 5, alpha) == pytest.approx(0.00179, abs=1e-5)  # ... 0.0018
    rng = np.random.default_rng(0)
    draws = rng.normal(effect, sd, size=(100_000, n))
    assert float((stats.ttest_1samp(draws, 0.0, axis=1).pvalue < alpha).mean()) == pytest.approx(
        0.8, abs=0.005)
    normal = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(0.8)) * sd / 400 ** 0.5
    assert detectable_effect(sd, 400, alpha) == pytest.approx(normal, rel=0.01)
    assert np.isnan(detectable_effect(sd, 1, alpha))


def test_the_equivalence_bound_is_the_90_percent_upper_end():
    values = pd.Series([0.001, -0.0005, 0.0002, 0.0004, -0.0001])
    high = stats.t.interval(0.90, 4, loc=values.mean(), scale=stats.sem(values))[1]
    assert equivalence_bound(values) == pytest.approx(high)
    # TOST: the one-sided t-test of "the lift is at least the bound" sits exactly at 0.05
    assert stats.ttest_1samp(values, high, alternative="less").pvalue == pytest.approx(0.05)


def test_the_reports_replicate_table_carries_the_exact_p_and_the_bound(tmp_path):
    df = pd.read_csv(_report(tmp_path) / REPLICATES_FILE, dtype={"source_trial": str})
    table = replicate_table(df, only=["a1"]).set_index("score")
    single = table.loc[f"lift vs {ARMS['single']}"]
    # seed lifts (0.01 - 0.01) / 2 = 0 and (0.01 + 0.01) / 2 = 0.01: the 0's sign is moot, so
    # all four sign assignments reach |sum| = 0.01
    assert single["p_exact"] == 1.0
    assert single["upper"] == pytest.approx(equivalence_bound(pd.Series([0.0, 0.01])))
    assert single["verdict"] == (f"CMG does not beat {ARMS['single']} (not shown at "
                                 f"Holm-adjusted 0.05; no more than {single['upper']:+.4f} AUROC, "
                                 "the 90% upper bound)")
    assert pd.isna(table.loc["CMG", "p_exact"])  # a score, not a lift


def test_a_does_not_verdict_carries_its_bound_and_few_seeds_say_so(tmp_path):
    text = headline_markdown([_report(tmp_path / "u")])
    family = len(QUESTIONS)
    assert (f"With 2 seeds the exact test cannot go below 2/2^2 = 0.5, above Holm's strictest "
            f"step 0.05/{family} = 0.01, so it can show no lift") in text
    assert f"{seeds_for_exact(0.05 / family)} seeds would let it" in text
    result = headline([_report(tmp_path / "u")])
    one = result["reports"][0]["lifts"]["single"]
    assert one["detectable"] == pytest.approx(detectable_effect(one["sd"], 2, 0.05 / family))
    mixing = next(line for line in text.splitlines() if line.startswith("- **Does class mixing"))
    assert f"does not, {one['mean']:+.4f}" in mixing
    assert f"no more than {one['upper']:+.4f} AUROC (90% upper bound)" in mixing
    assert f"the design detects {one['detectable']:.4f} at 80% power" in mixing


def test_each_arm_is_compared_at_its_own_tuned_configuration(tmp_path):
    """Replicates of a sweep per arm: the unmixed arm ran its own best (s7) and its own first
    trial (s0, the first trial's knobs) on the same cells; CMG's knobs are not run for it."""
    own = {k: v for k, v in AUROC.items() if k[:2] != ("a1", "single")}
    own.update({("s7", "single", seed, p): AUROC[("a1", "mixed", seed, p)] - 0.01 * p - 0.002 * seed
                for seed in (1, 2) for p in (1, 2)})
    own.update({("s0", "single", seed, p): 0.5 for seed in (1, 2) for p in (1, 2)})
    params = {**PARAMS, "s7": {"lr": 1e-3, "sigma": 2.0}, "s0": {"lr": 1e-4, "sigma": 3.0}}
    report = _report(tmp_path / "u", auroc=own, params=params)
    df = pd.read_csv(report / REPLICATES_FILE, dtype={"source_trial": str})
    arms = arm_configurations(df, "a1", "d0")
    assert arms["single"] == ("s7", True) and arms["none"] == ("a1", False)
    run = headline([report])["reports"][0]
    # lifts 0.012 and 0.022 (seed 1), 0.014 and 0.024 (seed 2): s7's, not s0's
    assert run["lifts"]["single"]["mean"] == pytest.approx(0.018)
    text = headline_markdown([report])
    assert f"| {ARMS['single']}, tuned " in text
    assert f"| {ARMS['none']}, at tuned CMG's knobs " in text
    # s7's lr is the top of the range: flagged beside tuned CMG's lr at the bottom
    assert f"{ARMS['single']}, tuned (trial `s7`): `lr` 0.001 sits at the high end" in text
    # two configurations of one arm that neither is the first trial: refused, by name
    params["s0"] = {"lr": 2e-4, "sigma": 3.0}
    proc = run_main("analysis.headline", str(_report(tmp_path / "v", auroc=own, params=params)))
    assert proc.returncode == 2 and "several configurations (s7, s0)" in proc.stderr


VARIANT = "none + stage2.label_smoothing=0"


def test_a_variant_is_a_score_and_a_descriptive_line_and_shows_once_it_ran_every_cell(tmp_path):
    """Head re-training without stage 1's label smoothing (tune.replicate --arms none --variant
    stage2.label_smoothing=0) beside the arm as the sweep ran it: a row of the scores, its
    difference from that arm by hand, in no question or Holm family; run on 3 of the 4 cells, it
    is left out and shrinks nothing."""
    variant = {("a1", VARIANT, seed, p): AUROC[("a1", "none", seed, p)] + 0.01 * seed
               for seed in (1, 2) for p in (1, 2)}
    plain = headline([_report(tmp_path / "plain")])
    full = headline([_report(tmp_path / "full", auroc={**AUROC, **variant})])
    run = full["reports"][0]
    label = f"{ARMS['none']}, with stage2.label_smoothing=0, at tuned CMG's knobs"
    assert run["labels"][VARIANT] == label
    assert run["scores"][VARIANT]["auroc"] == pytest.approx(
        run["scores"]["none"]["auroc"] + 0.015)
    # the variant minus the arm: 0.01 on seed 1's cells, 0.02 on seed 2's
    assert run["variants"][VARIANT]["mean"] == pytest.approx(0.015)
    assert run["variants"][VARIANT]["p"] == pytest.approx(
        stats.ttest_1samp([0.01, 0.02], 0.0).pvalue)
    assert full["family"] == plain["family"] == len(QUESTIONS)
    assert [one["p_holm"] for one in run["lifts"].values()] == pytest.approx(
        [one["p_holm"] for one in plain["reports"][0]["lifts"].values()])
    text = headline_markdown([_report(tmp_path / "full", auroc={**AUROC, **variant})])
    assert f"| {label} " in text
    line = next(line for line in text.splitlines() if line.startswith(f"- *{label}*"))
    assert ("minus the arm as the sweep ran it (a variant: in no question and no Holm family)"
            in line)
    assert f"+0.0150 [" in line
    # one cell short: no row, no line, the other scores on all four cells as before
    partial = {k: v for k, v in variant.items() if k[2:] != (2, 2)}
    short = headline([_report(tmp_path / "short", auroc={**AUROC, **partial})])["reports"][0]
    assert VARIANT not in short["scores"] and not short["variants"]
    assert short["scores"]["none"] == pytest.approx(plain["reports"][0]["scores"]["none"])
    # the report's replicate table likewise
    df = pd.read_csv(tmp_path / "short" / REPLICATES_FILE, dtype={"source_trial": str})
    assert f"lift vs {ARMS['none']}, with stage2.label_smoothing=0" not in set(
        replicate_table(df, only=["a1"])["score"])
    df = pd.read_csv(tmp_path / "full" / REPLICATES_FILE, dtype={"source_trial": str})
    table = replicate_table(df, only=["a1"]).set_index("score")
    over = table.loc[f"lift vs {ARMS['none']}, with stage2.label_smoothing=0"]
    assert over["mean"] == pytest.approx(table.loc[f"lift vs {ARMS['none']}", "mean"] - 0.015)
    # descriptive: a p, but in no Holm family, so the family's adjusted p-values stay as they were
    assert over["p"] > 0 and pd.isna(over["p_holm"])
    assert over["verdict"] == "a variant: in no Holm family"
    df = pd.read_csv(tmp_path / "plain" / REPLICATES_FILE, dtype={"source_trial": str})
    alone = replicate_table(df, only=["a1"]).set_index("score")["p_holm"].dropna()
    assert table.loc[alone.index, "p_holm"].tolist() == pytest.approx(alone.tolist())


def test_arms_on_other_weights_of_a_cells_classifier_are_refused(tmp_path):
    """Every run of a cell on the same classifier weights, not only the same key: a head-only run
    whose classifier was trained again (other bits) breaks the pairing, and the headline says
    how to mend it."""
    report = _report(tmp_path / "r")
    df = pd.read_csv(report / REPLICATES_FILE)
    df["stage1_weights"] = [f"c{seed}{p}+v{arm}" for seed, p, arm in
                            zip(df["seed"], df["partition"], df["arm"])]  # CVAEs differ: fine
    good = df["stage1_weights"].copy()
    df.to_csv(report / REPLICATES_FILE, index=False)
    assert run_main("analysis.headline", str(report)).returncode == 0
    df.loc[(df["arm"] == "none") & (df["seed"] == 2) & (df["partition"] == 1),
           "stage1_weights"] = "other+vnone"
    df.to_csv(report / REPLICATES_FILE, index=False)
    proc = run_main("analysis.headline", str(report))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cells seed 2 partition 1 ran their arms on different stage-1 weights" in proc.stderr
    assert "run tune.replicate again" in proc.stderr
    # a variant of the arm alike (its plain runs on the classifier's weights again)
    df["stage1_weights"] = good  # the head-only arm back on the cells' classifiers
    variant = df[(df["arm"] == "none") & (df["source_trial"] == "a1")].assign(arm=VARIANT)
    variant.loc[variant["seed"] == 1, "stage1_weights"] = "other+x"
    pd.concat([df, variant]).to_csv(report / REPLICATES_FILE, index=False)
    proc = run_main("analysis.headline", str(report))
    assert proc.returncode == 2 and ("cells seed 1 partition 1, seed 1 partition 2 ran"
                                     in proc.stderr), proc.stderr


def test_a_selected_configuration_on_a_bound_is_flagged_and_one_inside_is_not(tmp_path):
    flagged = headline_markdown([_report(tmp_path / "edge")])
    assert "Selected configurations on an edge of the searched range" in flagged
    assert ("CMG, tuned (trial `a1`): `lr` 1.16e-06 sits at the low end of [1e-06, 0.001] (2% "
            "of the range, log scale); widen it with the --space file line `lr: {low: 3.2e-08, "
            "high: 0.001, log: true}`") in flagged
    inside = {**PARAMS, "a1": {**PARAMS["a1"], "lr": 1e-4}}
    silent = headline_markdown([_report(tmp_path / "inside", params=inside)])
    assert "edge" not in silent and "--space" not in silent


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
    # one verdict per question (all were run), then a1's lr on the edge of its range
    assert text.count("\n- **Does") == len(QUESTIONS)
    assert text.count("\n- **Selected configurations on an edge") == 1


def test_refusals_name_the_fix(tmp_path):
    proc = run_main("analysis.headline", str(tmp_path))
    assert proc.returncode == 2 and "python -m tune.replicate" in proc.stderr
    for path in (_report(tmp_path / "r") / REPLICATES_FILE, tmp_path / "missing"):  # no folder
        proc = run_main("analysis.headline", str(path))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "is not a folder: pass report folders (python -m analysis.report" in proc.stderr
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


def test_the_headline_script_runs_its_parts_in_order_and_resumes(tmp_path):
    """scripts/headline.sh with a stand-in Python that records each command: both sweeps start
    (--arms all, 24 configurations), results/why.py measures each (unless it has), each new seed
    is replicated under both selections before the next (seeds 1..9: one seed's stage-1 models
    at a time), each followed by head re-training's variant without label smoothing, all of them
    once more (a run left on other stage-1 weights runs again), then the reports and the
    headline; run again once the sweeps exist, it resumes them instead."""
    import subprocess

    log, storage = tmp_path / "calls.txt", tmp_path / "hl"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)

    def calls() -> list[str]:
        subprocess.run(["bash", str(ROOT / "scripts/headline.sh"), str(storage)], check=True,
                       env={"PATH": "/usr/bin:/bin", "PY": str(fake)}, capture_output=True)
        lines = log.read_text().splitlines()
        log.unlink()
        return lines

    first = calls()
    assert [c.split()[:2] for c in first[:2]] == [["-m", "tune.sweep"]] * 2
    assert all("--arms all" in c and "--num-samples 24" in c for c in first[:2])
    assert "--select-on rotated" in first[1] and "--select-on" not in first[0]
    assert first[2:4] == [f"results/why.py {storage}/{name} --out {storage}/{name}/why.json"
                          for name in ("mnist-quick-unseen", "mnist-quick-blind")]
    replicates = [re.search(r"(unseen|blind) .*--seeds (\d)", c).groups() for c in first[4:40]]
    assert replicates == [(sel, str(n)) for n in range(1, 10) for sel in ("unseen", "blind")
                          for _ in ("plain", "variant")]
    assert all("--with-defaults" in c for c in first[4:40:2])
    assert all(c.endswith("--arms none --variant stage2.label_smoothing=0 --quiet")
               for c in first[5:40:2])
    repair = [re.search(r"(unseen|blind) .*--seeds (\d)", c).groups() for c in first[40:44]]
    assert repair == [(sel, "9") for sel in ("unseen", "blind") for _ in ("plain", "variant")]
    assert [c.split()[1] for c in first[44:]] == ["analysis.report"] * 2 + ["analysis.headline"]
    for name in ("mnist-quick-unseen", "mnist-quick-blind"):
        (storage / name).mkdir(parents=True)
        (storage / name / "manifest.json").write_text("{}")
    (storage / "mnist-quick-blind" / "why.json").write_text("[]")
    again = calls()
    assert [c.endswith("--resume") for c in again[:2]] == [True, True]
    assert again[2:] == first[2:3] + first[4:]  # the measurements made are not made again


def test_a_packed_storage_keeps_the_records_and_leaves_out_what_is_made_again(tmp_path):
    """scripts/pack_storage.py: the sweep's and the replicates' records go in; the stage-1 store,
    the heads and the scores of a stopped trial and of a replicate stay out, while those of a
    complete trial and of one Tune goes on with stay; the stage-1 digests go beside. A pack over
    an earlier one holds what changed since."""
    import subprocess
    import sys
    import tarfile

    storage = tmp_path / "hl"

    def put(rel: str, text: str = "x") -> None:
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        (storage / rel).write_text(text)

    put("stage1/key-a/cvae.pt")
    put("stage1/key-a/meta.json", json.dumps({"digests": {"cvae.pt": "abc"}}))
    put("sw/manifest.json")
    put("sw/optuna.journal")
    put("sw/experiment_state-1.json", json.dumps({"trial_data": [
        [json.dumps({"trial_id": i, "status": s})] for i, s in
        (("aaaa", "TERMINATED"), ("bbbb", "TERMINATED"), ("cccc", "PAUSED"))]}))
    for trial, rows in (("trial-1-aaaa", 5), ("trial-2-bbbb", 1), ("trial-3-cccc", 2)):
        put(f"sw/{trial}/partitions.jsonl", "{}\n" * rows)
        put(f"sw/{trial}/scores/partition-1.parquet")
        put(f"sw/{trial}/heads/partition-1.pt")
    put("sw/replicate/run-1/replicate-1-dddd/partitions.jsonl", "{}\n" * 5)
    put("sw/replicate/run-1/replicate-1-dddd/scores/partition-1.parquet")
    out = tmp_path / "pack.tar.xz"
    run = subprocess.run([sys.executable, str(ROOT / "scripts/pack_storage.py"), str(storage),
                          str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "9 files, 7 left out" in run.stdout, run
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        digests = json.load(tar.extractfile("hl-stage1-digests.json"))
    assert names == {"hl-stage1-digests.json", *(f"hl/sw/{f}" for f in (
        "manifest.json", "optuna.journal", "experiment_state-1.json",
        "trial-1-aaaa/partitions.jsonl", "trial-2-bbbb/partitions.jsonl",
        "trial-3-cccc/partitions.jsonl", "trial-1-aaaa/scores/partition-1.parquet",
        "trial-3-cccc/scores/partition-1.parquet",
        "replicate/run-1/replicate-1-dddd/partitions.jsonl"))}
    assert digests == {"key-a": {"cvae.pt": "abc"}}

    # the run goes on: a trial completes, a new one starts; a pack over the first holds the
    # changed files alone, and the two unpacked in order are the storage's records
    put("sw/trial-3-cccc/partitions.jsonl", "{}\n" * 5)
    put("sw/trial-4-eeee/partitions.jsonl", "{}\n" * 1)
    put("sw/optuna.journal", "xy")
    second = tmp_path / "pack-2.tar.xz"
    run = subprocess.run([sys.executable, str(ROOT / "scripts/pack_storage.py"), str(storage),
                          str(second), "--over", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "3 files (7 unchanged since 1 earlier pack(s))" in run.stdout
    with tarfile.open(second) as tar:
        assert set(tar.getnames()) == {"hl-stage1-digests.json", *(f"hl/sw/{f}" for f in (
            "optuna.journal", "trial-3-cccc/partitions.jsonl", "trial-4-eeee/partitions.jsonl"))}
    unpacked = tmp_path / "unpacked"
    for pack in (out, second):
        with tarfile.open(pack) as tar:
            tar.extractall(unpacked, filter="data")
    assert (unpacked / "hl/sw/optuna.journal").read_text() == "xy"
    assert (unpacked / "hl/sw/trial-3-cccc/partitions.jsonl").read_text() == "{}\n" * 5

    for args, fix in (([str(out)], "required: out"), ([str(storage), str(second), "--over",
                                                      str(tmp_path / "none.tar.xz")], "no pack")):
        bad = subprocess.run([sys.executable, str(ROOT / "scripts/pack_storage.py"), *args],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and fix in bad.stderr, bad
    assert tarfile.open(second).getnames()  # the failed call left the earlier pack whole
