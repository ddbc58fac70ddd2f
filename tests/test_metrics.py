"""Scores and metrics against values worked out by hand and a rank-based AUROC (not against
the scikit-learn calls the code itself makes)."""

import numpy as np
import pytest
import torch

from cmg.metrics import energy_score, evaluate_logits, msp_score, ood_metrics, softmax_ood_score


def test_perfect_and_inverted_scores():
    perfect = ood_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.8, 0.9]))
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    inverted = ood_metrics(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2, 0.3]))
    assert inverted["auroc"] == 0.0 and inverted["fpr95"] == 1.0


def rank_auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """Mann-Whitney: AUROC = (rank sum of the OOD scores - n_out (n_out + 1) / 2) / (n_in n_out),
    ranks 1..n over all scores, tied scores sharing the mean of their ranks."""
    s = np.r_[s_in, s_out]
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for value in np.unique(s):  # ties: the mean rank
        ranks[s == value] = ranks[s == value].mean()
    u = ranks[len(s_in):].sum() - len(s_out) * (len(s_out) + 1) / 2
    return u / (len(s_in) * len(s_out))


def test_metrics_on_a_small_example_with_ties_worked_out_by_hand():
    s_in, s_out = [0.1, 0.4, 0.4, 0.8], [0.4, 0.8, 0.9]
    m = ood_metrics(torch.tensor(s_in), torch.tensor(s_out, dtype=torch.float64))
    # AUROC = P(OOD > IND) + P(tie) / 2 over the 12 pairs: OOD 0.4 beats 0.1, ties the two
    # 0.4s (1 + 2/2); 0.8 beats three, ties one (3.5); 0.9 beats all four (4) -> 9.5 / 12
    assert m["auroc"] == pytest.approx(19 / 24, abs=1e-7)
    assert rank_auroc(np.array(s_in), np.array(s_out)) == pytest.approx(19 / 24, abs=1e-12)
    # AUPR-Out, thresholds 0.9 / 0.8 / 0.4 down: (recall, precision) = (1/3, 1), (2/3, 2/3),
    # (1, 3/6); the recall steps times precision: 1/3 + 2/9 + 1/6
    assert m["aupr_out"] == pytest.approx(13 / 18, abs=1e-7)
    # AUPR-In (IND positive, lowest score first), thresholds 0.1 / 0.4 / 0.8: (1/4, 1),
    # (3/4, 3/4), (1, 4/6): 1/4 + 3/8 + 1/6
    assert m["aupr_in"] == pytest.approx(19 / 24, abs=1e-7)
    # 95% of IND accepted needs all four (score <= 0.8); OOD 0.4 and 0.8 slip through
    assert m["fpr95"] == pytest.approx(2 / 3, abs=1e-7)


def test_auroc_is_the_rank_statistic_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.integers(0, 20, 700) / 4, rng.integers(3, 23, 300) / 4  # many ties
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(rank_auroc(s_in, s_out), abs=1e-12)
    # FPR95 by hand: accept the 95% lowest-scoring IND inputs, count the OOD that slip through
    threshold = np.sort(s_in)[int(np.ceil(0.95 * 700)) - 1]
    assert m["fpr95"] == pytest.approx(np.mean(s_out <= threshold), abs=1e-12)


def test_scores_use_only_the_ind_logits():
    logits = torch.tensor([[2.0, 0.0, 100.0], [0.0, 0.0, -100.0]])  # K = 2, slot 2 is OOD
    assert torch.allclose(energy_score(logits, 2), -torch.logsumexp(logits[:, :2], 1))
    assert torch.allclose(msp_score(logits, 2), -torch.softmax(logits[:, :2], 1).amax(1))
    assert softmax_ood_score(logits, 2)[0] > 0.99 and softmax_ood_score(logits, 2)[1] < 1e-6


def test_evaluate_logits_reports_ind_accuracy():
    logits_ind = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    logits_ood = torch.zeros(2, 3)
    m = evaluate_logits(logits_ind, torch.tensor([0, 1, 1]), logits_ood, energy_score, 2)
    assert m["ind_acc"] == pytest.approx(2 / 3) and m["auroc"] == 1.0
