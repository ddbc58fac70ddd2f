"""Guards a published number needs: checkpoints tied to their data split, label smoothing that
never touches the OOD slot, data.augment honoured, Setting-2 splits seeded by name, and an
analysis that counts each (trial, partition) once and ranks on validation only."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from analysis.study import importance
from analysis.trials import aggregate, leaderboard, load_trials
from cmg.backbone import BackboneSpec, load_backbone
from cmg.config import ClassifierConfig, DataConfig, budget_config
from cmg.data.split import Split, _split_ood_sets
from cmg.errors import UsageError
from cmg.stage1 import ind_smoothed_cross_entropy, load_stage1_model, train_classifier
from tune.artifacts import stage1_key


def _split(family: str = "mnist", data: DataConfig = DataConfig(), partition: int = 1) -> Split:
    """A tiny random split (2 IND classes), enough to train one epoch in milliseconds."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 28, 28) if family == "mnist" else (3, 32, 32)
    x = torch.randint(0, 256, (8, *shape), generator=gen, dtype=torch.uint8)
    y = torch.tensor([0, 1] * 4)
    return Split("same_dataset_mnist", partition, family, (0, 1), x, y, x, y, x, x, y, x, data=data)


CLF = ClassifierConfig(epochs=1, batch_size=4, head_width=16, amp=False)


def test_label_smoothing_spreads_over_the_ind_classes_only():
    logits = torch.tensor([[4.0, 1.0, 0.5, -9.0]], requires_grad=True)  # K = 3, slot 3 is OOD
    y = torch.tensor([0])
    loss = ind_smoothed_cross_entropy(logits, y, 3, 0.3)
    log_p = F.log_softmax(logits, 1)
    target = torch.tensor([[0.7 + 0.1, 0.1, 0.1, 0.0]])  # nothing on the OOD slot
    assert loss.item() == pytest.approx(-(target * log_p).sum().item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 3] > 0  # always pushes the OOD logit of an IND image down
    old = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(old, y, label_smoothing=0.3).backward()
    assert old.grad[0, 3] < 0  # torch's smoothing pulled it up, towards 0.3 / 4
    assert ind_smoothed_cross_entropy(logits, y, 3, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, y).item())


def test_stage1_key_of_existing_stores_is_unchanged_without_smoothing():
    cfg = budget_config("smoke")  # label_smoothing 0: the key computed before these guards
    assert stage1_key("same_dataset_mnist", 1, cfg) == "same_dataset_mnist-p1-ea5ae1101bbeb27b"
    smoothed = budget_config("smoke", overrides=["classifier.label_smoothing=0.1"])
    assert stage1_key("same_dataset_mnist", 1, smoothed) != stage1_key(
        "same_dataset_mnist", 1, replace(smoothed, classifier=cfg.classifier))


def test_data_augment_is_honoured(monkeypatch):
    calls = []
    import cmg.stage1

    real = cmg.stage1.random_crop_flip
    monkeypatch.setattr(cmg.stage1, "random_crop_flip", lambda x: calls.append(1) or real(x))
    train_classifier(_split("cifar", DataConfig(augment=False)), CLF, quiet=True)
    assert calls == []
    train_classifier(_split("cifar", DataConfig(augment=True)), CLF, quiet=True)
    assert len(calls) == 2  # one per batch


def test_a_checkpoint_is_refused_for_another_data_split(tmp_path):
    path = tmp_path / "clf.pt"
    train_classifier(_split(), CLF, checkpoint=path, quiet=True)
    load_stage1_model(path, "classifier", _split())  # the same split: fine
    other = _split(data=DataConfig(split_seed=1))
    with pytest.raises(UsageError, match="another data split"):
        load_stage1_model(path, "classifier", other)
    with pytest.raises(UsageError, match="another setting, partition or config"):
        train_classifier(other, CLF, checkpoint=path, quiet=True)  # cmg.run --stage1-dir
    # as a cmg backbone: another partition or split is a one-line error too
    load_backbone(path, "cmg", 2, "mnist", trained_for=("same_dataset_mnist", 1, DataConfig()))
    with pytest.raises(UsageError, match="partition 1, not same_dataset_mnist partition 2"):
        load_backbone(path, "cmg", 2, "mnist", trained_for=("same_dataset_mnist", 2, DataConfig()))
    with pytest.raises(UsageError, match="another data split"):
        load_backbone(path, "cmg", 2, "mnist",
                      trained_for=("same_dataset_mnist", 1, DataConfig(train_limit=5)))


def test_a_cmg_backbone_over_several_partitions_names_one_file_each(tmp_path):
    for p in (1, 2):
        (tmp_path / f"clf_p{p}.pt").write_bytes(b"x" * p)
    with pytest.raises(UsageError, match=r"put \{partition\} in --backbone"):
        BackboneSpec.from_args(tmp_path / "clf_p1.pt", "cmg", (1, 2))
    spec = BackboneSpec.from_args(tmp_path / "clf_p{partition}.pt", "cmg", (1, 2))
    assert spec.file(2) == str(tmp_path / "clf_p2.pt")
    with pytest.raises(UsageError, match="clf_p3.pt does not exist"):
        BackboneSpec.from_args(tmp_path / "clf_p{partition}.pt", "cmg", (1, 3))
    BackboneSpec.from_args(tmp_path / "clf_p1.pt", "cmg", (1,))  # one partition: one file


def test_setting2_ood_split_is_seeded_by_the_sets_name():
    a = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    b = torch.arange(100, 140, dtype=torch.uint8).view(40, 1, 1, 1)
    val1, test1, layout1 = _split_ood_sets({"A": a, "B": b}, DataConfig())
    val2, test2, layout2 = _split_ood_sets({"B": b, "A": a}, DataConfig())
    assert layout1 == (("A", 10, 40), ("B", 8, 32)) and layout2 == (("B", 8, 32), ("A", 10, 40))
    assert torch.equal(val1[:10], val2[8:]) and torch.equal(test1[:40], test2[32:])
    alone, _, _ = _split_ood_sets({"A": a}, DataConfig())
    assert torch.equal(alone, val1[:10])


def _fake_experiment(root, reports: list[dict]) -> None:
    folder = root / "stage2_trainable_abc12_00000_0_lr=1_2026"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"lr": 1.0}))
    base = {"trial_id": "abc12_00000", "partitions_total": 2}
    (folder / "result.json").write_text("\n".join(json.dumps({**base, **r}) for r in reports))


def test_analysis_counts_a_retried_partition_once(tmp_path):
    # partition 1 reported twice (a retry re-ran it), then partition 2: two distinct rows
    _fake_experiment(tmp_path, [{"partition": 1, "val_auroc": 0.5},
                                {"partition": 1, "val_auroc": 0.7},
                                {"partition": 2, "val_auroc": 0.9}])
    df = load_trials(tmp_path)
    assert list(df["partition"]) == [1, 2] and list(df["val_auroc"]) == [0.7, 0.9]
    assert (df["status"] == "complete").all()


def test_ranking_on_test_metrics_must_be_asked_for(tmp_path):
    _fake_experiment(tmp_path, [{"partition": p, "val_auroc": 0.5, "test_auroc": 0.6}
                                for p in (1, 2)])
    table = aggregate(load_trials(tmp_path))
    with pytest.raises(ValueError, match="rank on a validation metric"):
        leaderboard(table, by="test_auroc")
    with pytest.raises(ValueError, match="rank on a validation metric"):
        importance(tmp_path, by="test_auroc", table=table)
    board = leaderboard(table, by="test_auroc", allow_test=True)
    assert board["trial_id"].tolist() == ["abc12_00000"]
    assert board["test_auroc_mean"].tolist() == [pytest.approx(0.6)]
