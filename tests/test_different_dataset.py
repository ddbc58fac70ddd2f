"""Setting 2 (`different_dataset`): CIFAR-10 against other data sets, on a data root made of the
20 real CIFAR-10 and 20 real CIFAR-100 test images that install with foolbox, synthetic 3x32x32
images for volume, and OOD folders of generated PNG/JPEG images in both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from analysis.trial_files import load_scores
from analysis.figures import roc_figure
from analysis.report import write_report
from analysis.trials import trial_rows
from cmg.config import budget_config
from cmg.data import make_split
from cmg.data.ood import load_image_folder
from cmg.data.synthetic import noise_png
from cmg.errors import UsageError
from cifar_data import build_cifar_data_root, real_images
from cmg.backbone import BackboneSpec, file_sha256
from conftest import run_main
from test_cli import SMOKE, assert_usage_error, cli

PRESENT = ["LSUN", "tinyImageNet", "CIFAR100"]
ABSENT = ["SVHN", "LSUN-FIX", "ImageNet-FIX"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_cifar_data_root(tmp_path_factory.mktemp("data"))


def test_image_folders_load_flat_and_nested_png_and_jpeg(data_root):
    flat = load_image_folder(data_root / "LSUN_resize")
    assert flat.shape == (25, 3, 32, 32) and flat.dtype == torch.uint8
    first = np.array(Image.open(data_root / "LSUN_resize" / "0000.png"))
    assert torch.equal(flat[0], torch.from_numpy(first).permute(2, 0, 1))  # PNG is lossless
    assert load_image_folder(data_root / "Imagenet_resize").shape == (25, 3, 32, 32)


def test_split_holds_out_a_seeded_fifth_of_each_ood_set_for_validation(data_root):
    split = make_split("different_dataset", 1, data_root=data_root)
    assert split.num_classes == 10 and split.image_shape == (3, 32, 32)
    assert [name for name, _, _ in split.ood_sets] == ["LSUN", "tinyImageNet", "CIFAR100"]
    assert split.skipped_ood_sets == tuple(ABSENT)
    assert {name: (v, t) for name, v, t in split.ood_sets} == {
        "LSUN": (5, 20), "tinyImageNet": (5, 20), "CIFAR100": (4, 16)}
    # the real CIFAR-100 images are all used, none in both parts
    cifar100 = torch.from_numpy(real_images("cifar100")[0])
    val = split.val_ood_x[split.ood_slices("val")["CIFAR100"]]
    test = split.test_ood_x[split.ood_slices("test")["CIFAR100"]]
    seen = {bytes(x.numpy()) for x in torch.cat([val, test])}
    assert seen == {bytes(x.numpy()) for x in cifar100} and len(val) + len(test) == 20
    again = make_split("different_dataset", 1, data_root=data_root)
    assert torch.equal(again.val_ood_x, split.val_ood_x)  # fixed and seeded
    # validation IND comes from the CIFAR-10 train split; the real test images stay in the test
    assert len(split.val_ind_x) == 60 and len(split.test_ind_x) == 120


def test_a_wrong_size_image_or_an_empty_folder_is_a_one_line_error(tmp_path):
    noise_png(tmp_path / "LSUN_fix" / "a.png", 0)
    noise_png(tmp_path / "LSUN_fix" / "sub" / "b.png", 1, size=36)
    with pytest.raises(UsageError, match=r"b\.png is 36x36, not 32x32"):
        load_image_folder(tmp_path / "LSUN_fix")
    (tmp_path / "Imagenet_fix").mkdir()
    with pytest.raises(UsageError, match="no PNG or JPEG images in .*Imagenet_fix"):
        load_image_folder(tmp_path / "Imagenet_fix")


@pytest.mark.parametrize("ood, words", [
    ("SVHN", ["SVHN not found", "--download"]),
    ("MNIST", ["unknown OOD data set MNIST", "tinyImageNet"]),
])
def test_eval_with_an_absent_or_unknown_set_named_is_a_one_line_error(data_root, tmp_path, ood,
                                                                         words):
    proc = run_main("cmg.run", "--setting", "different_dataset", "--ood-dataset", ood,
                    "--data-root", str(data_root), "--out", str(tmp_path / "out"), *SMOKE)
    assert_usage_error(proc, *words)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_run_reports_every_present_ood_set_and_their_mean(data_root, tmp_path):
    proc = cli("cmg.run", "--setting", "different_dataset", "--ood-dataset", "all",
               "--data-root", str(data_root), "--out", str(tmp_path), *SMOKE,
               "--set", "data.train_limit=100", "--set", "classifier.batch_size=100",
               "--set", "cvae.batch_size=100")
    assert proc.returncode == 0, proc.stderr
    assert "skipped: SVHN, LSUN-FIX, ImageNet-FIX" in proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["ood_sets"]) == PRESENT and metrics["skipped_ood_sets"] == ABSENT
    for scores in (metrics, metrics["baselines"]["msp"], metrics["baselines"]["energy"]):
        for part in ("val", "test"):
            per_set = scores[part]["ood_sets"]
            assert list(per_set) == PRESENT
            for name in ("auroc", "fpr95"):
                assert scores[part][name] == pytest.approx(
                    np.mean([per_set[s][name] for s in PRESENT]))
    assert "test AUROC per OOD set" in proc.stdout and "tinyImageNet" in proc.stdout


def test_sweep_with_a_backbone_optimises_the_mean_over_the_present_ood_sets(backbone_sweep,
                                                                           tmp_path):
    """One Setting-2 sweep on a CSI backbone (conftest's, two configurations: its stage 1 trains
    only the CVAE; the CIFAR classifier's training is covered by the run and stage-1 tests above
    and below)."""
    storage, backbone = backbone_sweep["storage"], backbone_sweep["backbone"]
    experiment = backbone_sweep["experiment"]
    assert "skipped: SVHN, LSUN-FIX, ImageNet-FIX" in backbone_sweep["stderr"]
    classifier, cvae = (sorted((storage / "stage1").glob(f"*-{kind}-*"))
                        for kind in ("classifier", "cvae"))
    assert len(classifier) == len(cvae) == 1  # the backbone and one CVAE, reused by both trials
    meta = json.loads((classifier[0] / "meta.json").read_text())
    # `{partition}` in --backbone: the hash covers the files of every partition the sweep uses
    assert meta["backbone"] == BackboneSpec.from_args(backbone_sweep["template"], "csi").identity()
    assert meta["backbone"]["sha256"] != file_sha256(backbone)
    assert meta["history"] == []  # the backbone is not trained
    assert (classifier[0] / "backbone.pt").exists()
    assert not (classifier[0] / "classifier.pt").exists()
    assert (cvae[0] / "cvae.pt").exists()
    rows = [r for f in sorted(experiment.glob("trial-*")) for r in trial_rows(f)]
    assert len(rows) == 2 and all(r["partitions_total"] == 1 for r in rows)
    for r in rows:
        assert r["val_auroc_mean"] == pytest.approx(
            np.mean([r[f"val_{s}_auroc"] for s in PRESENT]))
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"]["complete"] == 2 and summary["stage1_trained"] == 2
    assert summary["best"]["metrics"]["val_auroc_std"] is None  # one partition: no spread
    assert "one partition: no spread" in backbone_sweep["stdout"]
    # the report shows the selected configuration on every OOD set, beside the baselines
    best = next(r for r in rows if r["trial_id"] == summary["best"]["trial_id"])
    report = write_report(str(experiment), tmp_path / "report")["report"].read_text()
    table = report[report.index("Per OOD set"):].split("\n\n")[1].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == PRESENT
    for line, name in zip(table[2:], PRESENT):
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert cells[1] == f"{best[f'test_{name}_auroc']:.4f}"
        assert cells[3] == f"{best[f'msp_test_{name}_auroc']:.4f}"
    assert "20% of each OOD data set" in report  # what the selection saw
    loso = report[report.index("Leave one OOD set out"):].split("\n\n")[1].splitlines()
    assert [line.split("|")[1].strip() for line in loso[2:]] == PRESENT
    # per-image scores: one `kind` per OOD set, whose AUROC they recompute; a ROC panel per set
    scores = load_scores(str(experiment), best["trial_id"])
    test = scores[scores["split"] == "test"]
    assert set(test["kind"]) == {"ind", *PRESENT}
    for name in PRESENT:
        pair = test[test["kind"].isin(["ind", name])]
        assert roc_auc_score(pair["kind"] == name, pair["cmg"]) == pytest.approx(
            best[f"test_{name}_auroc"], abs=1e-12)
    assert [ax.get_title() for ax in roc_figure(scores).axes] == PRESENT


def test_svhn_reads_torchvisions_test_file(tmp_path):
    from scipy.io import savemat

    from cmg.data.ood import load_svhn

    images = np.random.default_rng(0).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    (tmp_path / "SVHN").mkdir()
    savemat(tmp_path / "SVHN" / "test_32x32.mat",
            {"X": images.transpose(2, 3, 1, 0), "y": np.ones((7, 1))})  # SVHN's HWCN layout
    assert torch.equal(load_svhn(tmp_path), torch.from_numpy(images))


@pytest.mark.slow
def test_another_choice_of_ood_sets_reuses_the_stage1_models(data_root, tmp_path):
    """The OOD sets evaluated are not part of stage 1: a sweep on other OOD data finds the
    models trained for the first and only computes their features for the new sets."""
    from tune.artifacts import ArtifactStore, features_name
    from tune.shared_stage1 import SharedStage1

    cfg = budget_config("smoke", "cifar", ["data.train_limit=100", "classifier.batch_size=100",
                                           "cvae.batch_size=100"])
    store = ArtifactStore(str(tmp_path / "stage1"))
    first_split = make_split("different_dataset", 1, cfg.data, data_root, ood_datasets="LSUN")
    first = SharedStage1(store).ensure(first_split, cfg, torch.device("cpu"))
    split = make_split("different_dataset", 1, cfg.data, data_root,
                       ood_datasets="LSUN,CIFAR100")
    second = SharedStage1(store).ensure(split, cfg, torch.device("cpu"))
    assert first.trained == 2 and second.trained == 0 and first.keys == second.keys
    assert store.keys() == sorted(first.keys)
    assert {features_name(first_split), features_name(split)} == {
        p.name for p in (tmp_path / "stage1" / first.keys.classifier).glob("features*.pt")}
    # the new features are those of the same frozen network on the new OOD images
    assert torch.equal(second.features.train, first.features.train)
    assert len(second.features.evals["test"]["ood"]) == len(split.test_ood_x)
    assert second.features.baselines["msp"]["test"]["ood_sets"].keys() == {"LSUN", "CIFAR100"}
