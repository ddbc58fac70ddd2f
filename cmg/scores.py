"""Per-image OOD scores of one stage-2 result, as a table (one row per evaluated image).

Columns: `split` (val | test), `kind` (ind, or ood; in Setting 2 the OOD set's name), `label`
(the IND class id 0..K-1, -1 for OOD), then one float32 column per score, all "higher = more
OOD": `cmg` (the selected stage-2 head) and every baseline of `cmg.metrics.SCORES` (the stage-1
head). The scores are the very values `run_stage2`'s metrics come from, so every AUROC it
reports can be recomputed from this table (scikit-learn, OOD positive); a sweep writes it as
`scores/partition-N.parquet` in each trial's folder.

    table = score_table(classifier, result.head, features, split, "CMG-energy")
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

from cmg.metrics import SCORES, cmg_score
from cmg.data import Split

PARTS = ("val", "test")


def selected_head(classifier: torch.nn.Module, head_state: dict) -> torch.nn.Module:
    """A copy of the classifier's head holding a stage-2 result's selected weights."""
    head = copy.deepcopy(classifier.head).float()
    head.load_state_dict(head_state)
    return head.eval()


@torch.no_grad()
def score_table(classifier: torch.nn.Module, head_state: dict, features, split: Split,
                mode: str) -> pd.DataFrame:
    """Every val and test image's scores: CMG from the selected head (`head_state`, a
    `Stage2Result.head`), the baselines from the classifier's own (stage-1) head, computed on
    the frozen `features` (`cmg.stage2.FrozenFeatures`) exactly as the reported metrics are."""
    head, k = selected_head(classifier, head_state), split.num_classes
    frames = []
    for part in PARTS:
        feats = features.evals[part]
        n_ind, n_ood = len(feats["ind"]), len(feats["ood"])
        kind = np.array(["ind"] * n_ind + ["ood"] * n_ood, dtype=object)
        if split.ood_sets:
            for name, where in split.ood_slices(part).items():
                kind[n_ind + where.start:n_ind + where.stop] = name
        columns = {"split": np.full(n_ind + n_ood, part, dtype=object), "kind": kind,
                   "label": np.concatenate([feats["labels"].cpu().numpy(),
                                            np.full(n_ood, -1)]).astype(np.int64)}
        # IND and OOD pass through the heads separately, as `cmg.stage2._evaluate` does
        tuned = [head(feats["ind"]), head(feats["ood"])]
        stage1 = [classifier.head(feats["ind"]), classifier.head(feats["ood"])]
        columns["cmg"] = torch.cat([cmg_score(logits, k, mode) for logits in tuned])
        columns.update({name: torch.cat([fn(logits, k) for logits in stage1])
                        for name, fn in SCORES.items()})
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
