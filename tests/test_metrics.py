"""Scores and metrics against scikit-learn and hand-computed values."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from cmg.metrics import energy_score, evaluate_logits, msp_score, ood_metrics, softmax_ood_score


def test_perfect_and_inverted_scores():
    perfect = ood_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.8, 0.9]))
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    inverted = ood_metrics(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2, 0.3]))
    assert inverted["auroc"] == 0.0 and inverted["fpr95"] == 1.0


def test_metrics_equal_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 700), rng.normal(0.8, 1, 300)
    m = ood_metrics(s_in, s_out)
    y = np.r_[np.zeros(700), np.ones(300)]
    s = np.r_[s_in, s_out]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
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
