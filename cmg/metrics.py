"""OOD scores and metrics. Every score is "higher = more OOD"; OOD is the positive class.

    scores = energy_score(logits, num_classes=6)
    ood_metrics(scores_ind, scores_ood)  # {"auroc", "aupr_in", "aupr_out", "fpr95"}
"""

from __future__ import annotations

import numpy as np
import torch

from cmg.results import BASELINES
from cmg.models.classifier import ind_logits


def msp_score(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max-softmax baseline over the K IND logits, as a rank-equivalent that cannot saturate:
    `logsumexp_{j != argmax}(l_j - l_max)` = log(1 / max_softmax - 1), strictly decreasing in the
    max softmax. The max softmax itself is exactly 1.0 in float32 once the top logit leads by
    about 17, so confident IND and OOD images would tie."""
    ind = ind_logits(logits, num_classes).float()
    top = ind.amax(dim=1, keepdim=True)
    others = (ind - top).scatter(1, ind.argmax(dim=1, keepdim=True), float("-inf"))
    return torch.logsumexp(others, dim=1)


def energy_score(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Energy E(x) = -logsumexp of the K IND logits (never the OOD slot)."""
    return -torch.logsumexp(ind_logits(logits, num_classes).float(), dim=1)


def maxlogit_score(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max-logit baseline (MLS; Vaze et al., ICLR 2022): `-max_k l_k` over the K IND logits."""
    return -ind_logits(logits, num_classes).float().amax(dim=1)


def softmax_ood_score(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CMG-softmax: the log-odds of the extra OOD class (index K) over all K + 1 outputs,
    `l_K - logsumexp(l_0..l_{K-1})` = log(p_K / (1 - p_K)): strictly increasing in p_K, and
    never rounded to 0 or 1 as p_K is in float32."""
    logits = logits.float()
    return logits[:, num_classes] - torch.logsumexp(ind_logits(logits, num_classes), dim=1)


def cmg_score(logits: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    return (softmax_ood_score if mode == "CMG-softmax" else energy_score)(logits, num_classes)


# the baselines, one entry per key of cmg.results.BASELINES (same order)
SCORES = {"msp": msp_score, "energy": energy_score, "maxlogit": maxlogit_score}
assert tuple(SCORES) == tuple(BASELINES), "cmg.results.BASELINES and SCORES must list the same keys"


def ood_metrics(score_ind, score_ood) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR95 of an OOD score (higher = more OOD), by scikit-learn.

    - auroc, aupr_out: OOD is the positive class, ranked by the score.
    - aupr_in: IND is the positive class, ranked by the negated score.
    - fpr95: the share of OOD inputs accepted as IND at the threshold where 95% of the IND inputs
      are accepted (TPR measured on IND). Lower is better.
    """
    # imported here: scikit-learn costs a second and a half of start-up in every process that
    # imports the method, and stage-1 training (a prewarm task's whole process) never scores
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in = np.asarray(torch.as_tensor(score_ind).detach().float().cpu(), dtype=np.float64)
    s_out = np.asarray(torch.as_tensor(score_ood).detach().float().cpu(), dtype=np.float64)
    y = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    s = np.concatenate([s_in, s_out])
    if not np.isfinite(s).all():
        return {"auroc": float("nan"), "aupr_in": float("nan"), "aupr_out": float("nan"),
                "fpr95": float("nan")}
    fpr_ind_pos, tpr_ind_pos, _ = roc_curve(1 - y, -s)  # IND positive: TPR on IND, FPR on OOD
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(1 - y, -s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr95": float(fpr_ind_pos[np.searchsorted(tpr_ind_pos, 0.95, side="left")]),
    }


def evaluate_logits(logits_ind: torch.Tensor, labels_ind: torch.Tensor, logits_ood: torch.Tensor,
                    score_fn, num_classes: int,
                    ood_slices: dict[str, slice] | None = None) -> dict[str, float]:
    """All metrics of one score on one evaluation set, plus IND accuracy over the K IND logits.

    With `ood_slices` (Setting 2: several OOD data sets concatenated in `logits_ood`) every OOD
    metric is computed per set against the same IND images, reported under `ood_sets`, and the
    top-level values are their mean over the sets."""
    score_ind, score_ood = score_fn(logits_ind, num_classes), score_fn(logits_ood, num_classes)
    if ood_slices is None:
        metrics = ood_metrics(score_ind, score_ood)
    else:
        per_set = {name: ood_metrics(score_ind, score_ood[part]) for name, part in ood_slices.items()}
        metrics = {m: float(np.mean([v[m] for v in per_set.values()]))
                   for m in next(iter(per_set.values()))}
        metrics["ood_sets"] = per_set
    pred = ind_logits(logits_ind, num_classes).argmax(dim=1)
    metrics["ind_acc"] = float((pred == labels_ind.to(pred.device)).float().mean())
    return metrics
