"""Guards a published number needs: checkpoints tied to their data split, label smoothing that
never touches the OOD slot, data.augment honoured, Setting-2 splits seeded by name, and an
analysis that counts each (trial, partition) once and ranks on validation only."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from analysis.study import importance
from analysis.trials import aggregate, leaderboard, load_trials
from cmg.backbone import BackboneSpec, load_backbone
from cmg.config import ClassifierConfig, DataConfig, apply_overrides, budget_config
from cmg.data.split import Split, _split_ood_sets
from cmg.errors import UsageError
from cmg.results import ROWS_FILE
from cmg.stage1 import ind_smoothed_cross_entropy, load_stage1_model, train_classifier
from tune.artifacts import Stage1Keys, stage1_keys


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


def test_stage1_keys_are_pinned_and_each_hashes_only_what_its_model_depends_on():
    cfg = budget_config("smoke")  # a change of these strings orphans every store: bump the format
    keys = stage1_keys("same_dataset_mnist", 1, cfg)
    assert keys == ("same_dataset_mnist-p1-classifier-5088132e3954dc98",
                    "same_dataset_mnist-p1-cvae-c4081b7fdd72a6a8")
    assert Stage1Keys.parse(str(keys)) == keys
    changed = {knob: stage1_keys("same_dataset_mnist", 1, apply_overrides(cfg, {knob: value}))
               for knob, value in [("classifier.lr", 0.5), ("classifier.label_smoothing", 0.1),
                                   ("cvae.latent_dim", 7), ("cvae.kl_weight", 0.5),
                                   ("stage2.sigma", 9.0), ("data.eval_limit", 7),
                                   ("data.augment", False), ("data.train_limit", 7),
                                   ("data.split_seed", 7), ("data.val_ood", "rotated")]}
    same = {knob: (k.classifier == keys.classifier, k.cvae == keys.cvae)
            for knob, k in changed.items()}
    assert same == {"classifier.lr": (False, True), "classifier.label_smoothing": (False, True),
                    "cvae.latent_dim": (True, False), "cvae.kl_weight": (True, False),
                    "stage2.sigma": (True, True),  # stage 2 never retrains stage 1
                    # the features cover the evaluation images; the CVAE sees training images only
                    "data.eval_limit": (False, True), "data.augment": (False, True),
                    "data.train_limit": (False, False), "data.split_seed": (False, False),
                    # what validation OOD is: another features file of the same classifier
                    "data.val_ood": (True, True)}
    assert stage1_keys("same_dataset_mnist", 2, cfg).cvae != keys.cvae


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


def test_analysis_leaves_out_a_report_still_being_written(tmp_path):
    # Tune appends one JSON line per report: a reader polling the sweep can see a half line
    _fake_experiment(tmp_path, [{"partition": 1, "val_auroc": 0.5}])
    result = next(tmp_path.glob("stage2_trainable_*")) / "result.json"
    complete = result.read_text() + "\n"
    result.write_text(complete + '{"trial_id": "abc12_00000", "partition": 2, "val_au')
    df = load_trials(tmp_path)
    assert list(df["partition"]) == [1] and list(df["val_auroc"]) == [0.5]
    assert (df["status"] == "incomplete").all()
    result.write_text(complete + "{broken\n")  # a whole line that is not JSON: a broken file
    with pytest.raises(json.JSONDecodeError):
        load_trials(tmp_path)


def test_analysis_reads_full_rows_from_the_trial_file_and_old_experiments_from_result_json(
        tmp_path):
    # an old experiment: full rows in result.json only
    old = [{"partition": 1, "val_auroc": 0.5, "test_auroc": 0.4},
           {"partition": 2, "val_auroc": 0.7, "test_auroc": 0.6}]
    _fake_experiment(tmp_path / "old", old)
    df = load_trials(tmp_path / "old")
    assert list(df["test_auroc"]) == [0.4, 0.6] and (df["status"] == "complete").all()
    # this version: Tune's result.json holds a few keys, the trial's ROWS_FILE the full rows;
    # partition 1 was restored from a checkpoint written before ROWS_FILE existed
    _fake_experiment(tmp_path / "new", [old[0], {"partition": 2, "val_auroc_mean": 0.6}])
    folder = next((tmp_path / "new").glob("stage2_trainable_*"))
    (folder / ROWS_FILE).write_text(json.dumps(
        {"trial_id": "abc12_00000", "partitions_total": 2, **old[1], "test_auroc": 0.9}) + "\n")
    df = load_trials(tmp_path / "new")
    assert list(df["partition"]) == [1, 2] and list(df["test_auroc"]) == [0.4, 0.9]
    assert (df["status"] == "complete").all()


def _cluster_yaml_capacity(**changes):
    import yaml

    from conftest import ROOT
    from tune.placement import capacity_from_config

    return capacity_from_config({**yaml.safe_load((ROOT / "cluster.yaml").read_text()),
                                 **changes})


def test_an_autoscaling_cluster_is_judged_by_its_node_types():
    """cluster.yaml: 8 gpu_1x (4 CPU, 1 GPU) + 4 gpu_4x (48 CPU, 4 GPU), 12 workers at most, a
    head with 0 CPUs: 8 + 16 = 24 GPUs, whatever is running now."""
    from tune.placement import gpu_share

    aws = _cluster_yaml_capacity()
    assert aws.total_gpus() == 24 and aws.most("gpus") == 4 and aws.most("cpus") == 48
    assert aws.slots(cpus=1, gpus=1) == 8 * 1 + 4 * 4
    assert aws.slots(cpus=1, gpus=0.25) == 8 * 4 + 4 * 16  # gpu_1x: 4 CPUs bound it
    assert aws.slots(cpus=2, gpus=0) == 8 * 2 + 4 * 24
    # 6 workers at most: the 4 nodes of 4 GPUs first, then 2 of 1
    assert _cluster_yaml_capacity(max_workers=6).slots(cpus=1, gpus=1) == 4 * 4 + 2 * 1
    # a whole GPU each, unless --max-concurrent asks for k >= 2 trials on every GPU
    assert [gpu_share(24, c) for c in (None, 24, 47, 48, 71, 96, 100)] == [
        1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("cpus, gpus, words", [
    (1, 8, "--gpus-per-trial 8 cannot be placed: the cluster has 24 GPUs, at most 4 on one node "
           "(the autoscaler's node types: gpu_1x 8 x (4 CPU, 1 GPU), gpu_4x 4 x (48 CPU, 4 GPU))"),
    (64, 1, "--cpus-per-trial 64 cannot be placed: the largest node has 48 CPUs"),
])
def test_a_trial_no_node_type_can_hold_is_refused(cpus, gpus, words):
    from tune.placement import check_fits

    check_fits(_cluster_yaml_capacity(), cpus=48, gpus=4)  # the largest node type holds it
    with pytest.raises(UsageError) as refused:
        check_fits(_cluster_yaml_capacity(), cpus=cpus, gpus=gpus)
    assert str(refused.value).startswith(words)


def test_cpus_and_gpus_on_different_nodes_are_refused():
    from tune.placement import Capacity, NodeShape, check_fits

    split = Capacity((NodeShape("cpu", 64, 0, 2), NodeShape("gpu", 4, 1, 2)), autoscaling=False)
    assert split.slots(cpus=4, gpus=1) == 2 and split.slots(cpus=8, gpus=0) == 16
    with pytest.raises(UsageError, match="--cpus-per-trial 8 with --gpus-per-trial 1 cannot be "
                                         "placed: no node has both"):
        check_fits(split, cpus=8, gpus=1)


def test_more_cpus_than_any_node_fail_at_once_on_a_real_local_ray(tmp_path):
    """It waited forever before: now one line, exit 2, nothing written (in-process, real Ray,
    which prints no notice of its own)."""
    from conftest import assert_refused

    assert_refused(tmp_path / "store", "--setting", "synthetic_cifar10", "--cpus-per-trial",
                   "1000", words=["--cpus-per-trial 1000 cannot be placed: the largest node has",
                                  "CPUs (the nodes alive now: node 1 x (",
                                  "lower --cpus-per-trial"])
