"""Scores and metrics against values worked out by hand and a rank-based AUROC (not against
the scikit-learn calls the code itself makes)."""

import numpy as np
import pytest
import torch

from cmg.results import BASELINES
from cmg.metrics import (SCORES, energy_score, evaluate_logits, maxlogit_score, msp_score,
                         ood_metrics, softmax_ood_score)


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
    assert torch.allclose(msp_score(logits, 2), torch.tensor([-2.0, 0.0]))  # log(1/msp - 1)
    assert torch.equal(maxlogit_score(logits, 2), torch.tensor([-2.0, -0.0]))
    assert softmax_ood_score(logits, 2)[0] > 90 and softmax_ood_score(logits, 2)[1] < -90


def test_evaluate_logits_reports_ind_accuracy():
    logits_ind = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    logits_ood = torch.zeros(2, 3)
    m = evaluate_logits(logits_ind, torch.tensor([0, 1, 1]), logits_ood, energy_score, 2)
    assert m["ind_acc"] == pytest.approx(2 / 3) and m["auroc"] == 1.0


def test_every_baseline_has_a_score():
    assert list(SCORES) == list(BASELINES) == ["msp", "energy", "maxlogit"]


@pytest.mark.parametrize("margins_of", ["msp", "softmax_ood"])
def test_scores_do_not_saturate_at_large_margins(margins_of):
    """Top logit leading by 20, 30 and 40: float32 softmax rounds all three to exactly 1.0 (a
    tie); the scores stay distinct and ordered (larger margin = more confident = lower score)."""
    margins = torch.tensor([20.0, 30.0, 40.0])
    if margins_of == "msp":  # K = 3 IND logits plus an OOD slot that must be ignored
        logits = torch.stack([margins, torch.zeros(3), torch.zeros(3), torch.full((3,), 99.0)], 1)
        old = torch.softmax(logits[:, :3], 1).amax(1)
        new = msp_score(logits, 3)
        assert torch.all(old == 1.0)  # the tie the old score had
        assert new[0] > new[1] > new[2]  # -> higher = more OOD for the smallest margin
    else:  # CMG-softmax, K = 2: the OOD slot leads the IND logits by 20, 30, 40
        logits = torch.stack([torch.zeros(3), torch.zeros(3), margins], 1)
        old = torch.softmax(logits, 1)[:, 2]
        new = softmax_ood_score(logits, 2)
        assert torch.all(old == 1.0)
        assert new[0] < new[1] < new[2]
        assert torch.allclose(new, margins - np.log(2.0))
    assert len(set(new.tolist())) == 3


def test_scores_rank_like_the_float64_softmax_on_moderate_logits():
    """On moderate logits the non-saturating scores give exactly the AUROC of the softmax they
    replace, computed in float64."""
    gen = torch.Generator().manual_seed(0)
    ind = torch.randn(400, 5, generator=gen, dtype=torch.float64) * 3
    ind[:, 0] += 4  # confident-ish IND images
    ood = torch.randn(300, 5, generator=gen, dtype=torch.float64) * 3
    msp64 = lambda x: -torch.softmax(x[:, :4], 1).amax(1)  # noqa: E731
    pk64 = lambda x: torch.softmax(x, 1)[:, 4]  # noqa: E731
    for new, reference in ((msp_score, msp64), (softmax_ood_score, pk64)):
        got = ood_metrics(new(ind.float(), 4), new(ood.float(), 4))["auroc"]
        want = ood_metrics(reference(ind).numpy(), reference(ood).numpy())["auroc"]
        assert got == pytest.approx(want, abs=1e-12)
        assert 0.6 < got < 1.0
