"""Per-image OOD scores of one stage-2 result, as a table (one row per evaluated image).

Columns: `split` (val | test), `kind` (ind, or ood; in Setting 2 the OOD set's name), `label`
(the IND class id 0..K-1, -1 for OOD), then one float32 column per score, all "higher = more
OOD": `cmg` (the selected stage-2 head), every baseline of `cmg.metrics.SCORES` (the stage-1
head) and the same baselines of the selected stage-2 head (`head_msp`, ...:
cmg.results.HEAD_BASELINES). The scores are the very values `run_stage2`'s metrics come from, so every AUROC it
reports can be recomputed from this table (scikit-learn, OOD positive); a sweep writes it as
`scores/partition-N.parquet` in each trial's folder.

    table = score_table(classifier, result, features, split, "CMG-energy")
    val = table[table.split == "val"]; roc_auc_score(val.kind != "ind", val.cmg)

Also `ind_threshold`: the score at which a share `tpr` of IND images is accepted (the exported
detector's threshold, from the validation rows).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import torch

from cmg.data import Split
from cmg.metrics import SCORES, cmg_score
from cmg.stage2 import FrozenFeatures, Stage2Result, _logits

PARTS = ("val", "test")


def selected_head(classifier: torch.nn.Module, head_state: dict) -> torch.nn.Module:
    """A copy of the classifier's head holding a stage-2 result's selected weights."""
    head = copy.deepcopy(classifier.head).float()
    head.load_state_dict(head_state)
    return head.eval()


def stage1_logits(classifier: torch.nn.Module, features: FrozenFeatures):
    """The stage-1 head's (IND, OOD) logits of val and test: those `freeze_features` kept, or,
    for features stored without them (a stage-1 store from before they were kept), computed
    once here."""
    if features.stage1_logits is None:
        features.stage1_logits = {part: _logits(classifier.head, features.evals[part])
                                  for part in PARTS}
    return features.stage1_logits


@torch.no_grad()
def score_table(classifier: torch.nn.Module, result: Stage2Result, features: FrozenFeatures,
                split: Split, mode: str) -> pd.DataFrame:
    """Every val and test image's scores: CMG from the selected head's logits that `result`'s
    metrics came from, the baselines from the classifier's own (stage-1) head on the same
    frozen `features`, the way `freeze_features` scored them."""
    k, baseline_logits = split.num_classes, stage1_logits(classifier, features)
    frames = []
    for part in PARTS:
        labels = features.evals[part]["labels"]
        n_ind, n_ood = len(labels), len(result.logits[part][1])
        kind = np.array(["ind"] * n_ind + ["ood"] * n_ood, dtype=object)
        if split.ood_sets:
            for name, where in split.ood_slices(part).items():
                kind[n_ind + where.start:n_ind + where.stop] = name
        columns = {"split": np.full(n_ind + n_ood, part, dtype=object), "kind": kind,
                   "label": np.concatenate([labels.cpu().numpy(),
                                            np.full(n_ood, -1)]).astype(np.int64),
                   "cmg": torch.cat([cmg_score(x, k, mode) for x in result.logits[part]]),
                   **{name: torch.cat([fn(x, k) for x in baseline_logits[part]])
                      for name, fn in SCORES.items()},
                   **{f"head_{name}": torch.cat([fn(x, k) for x in result.logits[part]])
                      for name, fn in SCORES.items()}}
        frames.append(pd.DataFrame({c: v.float().cpu().numpy() if torch.is_tensor(v) else v
                                    for c, v in columns.items()}))
    return pd.concat(frames, ignore_index=True)


def to_parquet_bytes(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def ind_threshold(scores_ind, tpr: float = 0.95) -> float:
    """The smallest score t with at least `tpr` of the IND scores <= t: `score > t` flags OOD."""
    ordered = np.sort(np.asarray(scores_ind, dtype=np.float64))
    return float(ordered[int(np.ceil(tpr * len(ordered))) - 1])
