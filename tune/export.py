"""`python -m tune.export`: write a sweep trial's detectors, one folder per partition.

    python -m tune.export experiments/same_dataset_mnist-CMG-energy-demo --out detector
    python -m tune.export s3://bucket/sweeps/NAME --trial 3f2a1_00004 --out detector

The trial is the best complete configuration on validation (`cmg.results.Experiment.ranked`,
never the test set) unless --trial names one. For each partition the trial finished,
DIR/partition-N/ gets the stage-2 head selected on validation (the trial's heads/partition-N.pt),
the frozen stage-1 classifier or, with a backbone, a copy of the partition's backbone file (both
from the sweep's stage-1 store, where the trials read them), and detector.json with the
threshold at 95% IND true-positive rate on the validation images (from the trial's
scores/partition-N.parquet). Each folder holds all it needs (detector.json names its files
relative to the folder): copy it to any machine with cmg installed, then
`cmg.detector.Detector.load(DIR/partition-N)` or `python -m cmg.score DIR/partition-N INPUT`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from cmg.data import get_setting
from cmg.detector import BACKBONE, SCALING, write_detector
from cmg.errors import (OneLineParser, command_parser, ensure_writable_dir, exit_on_usage_error,
                        fail)
from cmg.results import (Experiment, NotAnExperiment, TrialFolder, checkpoint_head_file,
                         head_file, scores_file)
from cmg.score_table import ind_threshold
from tune.artifacts import ArtifactStore, Stage1Keys

STAGE1_KEEP = ("format", "version", "kind", "setting", "partition", "family", "num_classes",
               "config", "model", "epoch")  # what loading a classifier needs (no optimizer)


def build_parser() -> OneLineParser:
    p = command_parser("python -m tune.export", __doc__)
    p.add_argument("experiment", help="experiment folder (STORAGE/NAME) or a pyarrow URI")
    p.add_argument("--trial", default=None,
                   help="trial id (default: the best complete configuration on validation)")
    p.add_argument("--out", required=True, help="output folder; gets partition-N/ folders")
    return p


def best_trial(experiment: str) -> str:
    """The id of the best complete configuration on mean validation AUROC."""
    ranked = Experiment.open(experiment).ranked()
    if not ranked:
        fail(f"no configuration of {experiment} finished all its partitions; pass --trial ID")
    return ranked[0].trial_id


def latest_checkpoint(exp: Experiment, folder: TrialFolder) -> str:
    """The trial's last checkpoint folder, relative to the experiment."""
    checkpoints = [p for p in exp.folders(folder.name)
                   if p.rsplit("/", 1)[-1].startswith("checkpoint_")]
    if not checkpoints:
        fail(f"trial folder {folder.path} has no checkpoint: the trial finished no partition")
    return checkpoints[-1].removeprefix(exp.root + "/")


def backbone_meta(trial: dict[str, Any], backbone: bytes | None) -> dict[str, Any] | None:
    """detector.json's backbone: its copy in the folder, and what the sweep was given."""
    if backbone is None:
        return None
    return {"path": BACKBONE, "format": trial["backbone"]["format"],
            "sha256": hashlib.sha256(backbone).hexdigest(), "sweep": trial["backbone"]}


def detector_meta(trial: dict[str, Any], record: dict[str, Any], scores: pd.DataFrame,
                  source: dict[str, Any], backbone: bytes | None) -> dict[str, Any]:
    setting = get_setting(trial["setting"])
    ind = setting.ind_classes(record["partition"])
    val_ind = scores[(scores["split"] == "val") & (scores["kind"] == "ind")]
    return {
        "setting": setting.name, "partition": record["partition"], "family": setting.family,
        "ind_classes": list(ind), "ind_class_names": [setting.class_name(c) for c in ind],
        "mode": trial["config"]["stage2"]["mode"], "config": trial["config"],
        "input": {"shape": list(setting.image_shape), "dtype": "uint8", "scaling": SCALING},
        "threshold": ind_threshold(val_ind["cmg"], 0.95),
        "threshold_rule": "is_ood = cmg > threshold; 95% of the validation IND images score "
                          "at or below it",
        "metrics": record["metrics"], "backbone": backbone_meta(trial, backbone),
        "source": {**source, "stage1_key": record["stage1_key"],
                   "selected_epoch": record["selected_epoch"]},
    }


def export(experiment: str, out: str | Path, trial_id: str | None = None) -> list[Path]:
    """Write OUT/partition-N/ for every partition the trial finished; returns the folders.
    Everything is read and checked before the first folder is written."""
    trial_id = trial_id or best_trial(experiment)
    exp = Experiment.open(experiment)
    folder = exp.trial(trial_id)
    trial = exp.record(folder)
    checkpoint = latest_checkpoint(exp, folder)
    records = json.loads(exp.read_bytes(checkpoint, "partitions.json"))
    out = ensure_writable_dir(out)
    taken = [f"partition-{r['partition']}" for r in records
             if (out / f"partition-{r['partition']}").exists()]
    if taken:
        fail(f"{out} already holds {', '.join(taken)}; choose another --out or delete them")
    store = ArtifactStore(trial["stage1_store"])
    detectors = []
    for record in records:
        p = record["partition"]
        try:
            scores = pd.read_parquet(io.BytesIO(exp.read_bytes(folder.name, scores_file(p))))
        except NotAnExperiment:
            scores = pd.DataFrame()
        if scores.empty:
            fail(f"trial {trial_id} has no scores of partition {p} ({scores_file(p)}); was it "
                 "run by this version of tune.sweep?")
        try:
            head_bytes = exp.read_bytes(folder.name, head_file(p))
        except NotAnExperiment:  # written before heads had their own files
            head_bytes = exp.read_bytes(checkpoint, checkpoint_head_file(p))
        head = torch.load(io.BytesIO(head_bytes), weights_only=True)
        key = Stage1Keys.parse(record["stage1_key"]).classifier
        classifier, backbone = None, None
        if trial["backbone"] is None:
            state = torch.load(io.BytesIO(store.read_bytes(key, "classifier.pt")),
                               weights_only=True)
            classifier = {k: state[k] for k in STAGE1_KEEP}
        else:  # the partition's file ({partition} resolved), as the sweep published it
            backbone = store.read_bytes(key, "backbone.pt")
        meta = detector_meta(trial, record, scores, {"experiment": experiment,
                                                     "trial_id": trial_id}, backbone)
        detectors.append((out / f"partition-{p}", meta, head, classifier, backbone))
    return [write_detector(*detector) for detector in detectors]


@exit_on_usage_error
def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    try:
        trial_id = args.trial or best_trial(args.experiment)
        folders = export(args.experiment, args.out, trial_id)
    except NotAnExperiment as err:
        fail(str(err))
    print(f"exported trial {trial_id}: " + ", ".join(str(f) for f in folders))
    print(f"score images with: python -m cmg.score {folders[0]} INPUT --out scores.csv")
    return folders


if __name__ == "__main__":
    main(sys.argv[1:])
