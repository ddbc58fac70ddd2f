"""Per-image scores, ROC/histogram figures, the exported detector, `cmg.score`, and the report's
reproduce command: on the shared smoke sweep (real MNIST, real Ray), checked with scikit-learn."""

import contextlib
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from analysis.trial_files import load_scores, load_trial_record, reproduce_command, score_columns
from analysis.figures import roc_figure, scores_figure
from analysis.trials import aggregate, leaderboard, load_trials, trial_rows
from cmg.checkpoint import load_checkpoint
from cmg.cli import setup_run
from cmg.config import DataConfig, budget_config
from cmg.data import make_split
from cmg.data.sources import MNIST_FILES, _find_mnist_dir, _idx_path, load_mnist, resolve_data_root
from cmg.detector import Detector
from cmg.errors import UsageError
from cmg.metrics import SCORES
from cmg.run import build_parser as run_parser
from cmg.score import main as score_main
from cmg.score_table import ind_threshold
from conftest import ROOT


def best_trial(experiment: Path) -> str:
    return leaderboard(aggregate(load_trials(experiment)))["trial_id"].iloc[0]


# -- fast: no sweep ----------------------------------------------------------------------------

def test_reproduce_command_rebuilds_the_trials_exact_config():
    seeds = [f"{s}.seed=3" for s in ("classifier", "cvae", "stage2")]
    config = budget_config("smoke", "mnist", seeds + [
        "stage2.mode=CMG-softmax", "stage2.sigma=4.25", "stage2.lr=0.000123",
        "stage2.mixing=convex", "data.train_limit=192", "cvae.latent_dim=16"]).to_dict()
    trial = {"setting": "same_dataset_mnist", "family": "mnist", "budget": "smoke",
             "device": "cpu", "threads": 1, "data_root": "/data root", "config": config}
    command = shlex.split(reproduce_command(trial, partition=4))
    assert command[:4] == ["OMP_NUM_THREADS=1", "python", "-m", "cmg.run"]
    args = run_parser().parse_args(command[4:])
    _, partition, cfg, device = setup_run(args, args.setting, args.partition, args.mode)
    assert (partition, str(device), args.data_root) == (4, "cpu", "/data root")
    assert cfg.to_dict() == config
    assert command.count("--set") == 5  # only what differs from the budget (seeds: --seed)
    # the data root as the sweep was given it: none given, none shown (no machine's folder)
    assert "--data-root" not in reproduce_command({**trial, "data_root_given": None}, 4)
    relative = shlex.split(reproduce_command({**trial, "data_root_given": "data"}, 4))
    assert relative[relative.index("--data-root") + 1] == "data"


def test_ind_threshold_accepts_95_percent_of_ind():
    scores = np.random.default_rng(0).normal(size=1000)
    t = ind_threshold(scores, 0.95)
    assert (scores <= t).mean() == 0.95 and (scores < t).mean() < 0.95


# -- on the shared smoke sweep -----------------------------------------------------------------

def test_scores_files_recompute_every_auroc_of_the_trial(smoke_sweep):
    checked = 0
    for folder in smoke_sweep["experiment"].glob("trial-*"):
        for row in trial_rows(folder):
            table = pd.read_parquet(folder / "scores" / f"partition-{row['partition']}.parquet")
            assert list(table.columns) == ["split", "kind", "label", "cmg", *SCORES,
                                           *(f"head_{name}" for name in SCORES)]
            assert ((table["label"] == -1) == (table["kind"] != "ind")).all()
            assert set(table["split"]) == {"val", "test"}
            for part, rows in table.groupby("split"):
                assert rows["kind"].value_counts().to_dict() == {"ind": 64, "ood": 64}
                for score in score_columns(table):
                    key = f"{part}_auroc" if score == "cmg" else f"{score}_{part}_auroc"
                    auroc = roc_auc_score(rows["kind"] != "ind", rows[score])
                    assert auroc == pytest.approx(row[key], abs=1e-12), (folder.name, key)
                    checked += 1
    assert checked >= 5 * 2 * 3  # the best trial alone: 5 partitions x val/test x 3 scores


def test_roc_and_score_figures_show_one_panel_per_partition(smoke_sweep):
    scores = load_scores(smoke_sweep["experiment"], best_trial(smoke_sweep["experiment"]))
    assert sorted(scores["partition"].unique()) == [1, 2, 3, 4, 5]
    roc = roc_figure(scores)
    assert len(roc.axes) == 5
    for ax in roc.axes:  # a curve per score (+ the diagonal), labelled with its test AUROC
        assert len(ax.lines) == len(score_columns(scores)) + 1
    first = scores[(scores["partition"] == 1) & (scores["split"] == "test")]
    label = roc.axes[0].get_legend().get_texts()[0].get_text()
    assert label == f"CMG {roc_auc_score(first['kind'] != 'ind', first['cmg']):.3f}"
    assert len(scores_figure(scores).axes) == 2 * 5  # CMG and the best baseline


def test_report_reproduce_command_gives_the_trials_val_auroc(smoke_sweep, tmp_path):
    report_dir = smoke_sweep["experiment"] / "report"
    assert {"roc.png", "scores.png"} <= {p.name for p in report_dir.iterdir()}
    report = (report_dir / "report.md").read_text()
    command = report.split("```\nOMP_NUM_THREADS=")[1].split("\n```")[0]
    best = best_trial(smoke_sweep["experiment"])
    assert "OMP_NUM_THREADS=" + command == reproduce_command(
        load_trial_record(smoke_sweep["experiment"], best), 1)
    threads, python, *args = shlex.split(command)  # "1", "python", "-m", "cmg.run", ...
    assert python == "python" and args[:2] == ["-m", "cmg.run"]
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "run"), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads})
    assert proc.returncode == 0, proc.stderr
    rerun = json.loads((tmp_path / "run" / "metrics.json").read_text())
    folder = next(smoke_sweep["experiment"].glob(f"trial-*-{best}"))
    trial_row = next(r for r in trial_rows(folder) if r["partition"] == 1)
    assert rerun["val"]["auroc"] == pytest.approx(trial_row["val_auroc"], abs=1e-6)
    assert rerun["test"]["auroc"] == pytest.approx(trial_row["test_auroc"], abs=1e-6)


@pytest.fixture(scope="module")
def exported(smoke_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "detector"
    proc = subprocess.run([sys.executable, "-m", "tune.export", str(smoke_sweep["experiment"]),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_writes_the_best_trial_on_validation(smoke_sweep, exported):
    summary = json.loads((smoke_sweep["experiment"] / "summary.json").read_text())
    assert sorted(p.name for p in exported.iterdir()) == [f"partition-{p}" for p in range(1, 6)]
    meta = json.loads((exported / "partition-2" / "detector.json").read_text())
    assert meta["source"]["trial_id"] == summary["best"]["trial_id"]
    assert (meta["partition"], meta["ind_classes"], meta["input"]["shape"]) == (
        2, [1, 2, 3, 4, 5, 6], [1, 28, 28])
    scores = load_scores(smoke_sweep["experiment"], meta["source"]["trial_id"])
    val_ind = scores[(scores["partition"] == 2) & (scores["split"] == "val")
                     & (scores["kind"] == "ind")]["cmg"]
    assert meta["threshold"] == ind_threshold(val_ind)
    assert (val_ind > meta["threshold"]).mean() <= 0.05
    state = load_checkpoint(exported / "partition-2" / "classifier.pt", "classifier")
    assert "optimizer" not in state and state["partition"] == 2
    assert set(torch.load(exported / "partition-2" / "head.pt", weights_only=True)) == {
        "hidden.weight", "hidden.bias", "out.weight", "out.bias"}


def test_an_experiment_with_heads_in_its_checkpoints_still_exports(smoke_sweep, exported,
                                                                   tmp_path):
    """Before heads had their own files, each checkpoint held every finished head."""
    from tune.export import export

    trial = json.loads((exported / "partition-1" / "detector.json").read_text())["source"]
    old = tmp_path / "old"
    folder = next(smoke_sweep["experiment"].glob(f"trial-*-{trial['trial_id']}"))
    shutil.copytree(folder, old / folder.name)
    checkpoint = sorted((old / folder.name).glob("checkpoint_*"))[-1]
    for head in sorted((old / folder.name / "heads").glob("partition-*.pt")):
        head.rename(checkpoint / f"head-{head.name}")
    (old / folder.name / "heads").rmdir()
    written = export(str(old), tmp_path / "detector", trial["trial_id"])
    assert [p.name for p in written] == [f"partition-{p}" for p in range(1, 6)]
    for p in (1, 5):
        assert (tmp_path / "detector" / f"partition-{p}" / "head.pt").read_bytes() == (
            exported / f"partition-{p}" / "head.pt").read_bytes()


def test_exporting_into_a_used_folder_is_one_line_and_changes_nothing(smoke_sweep, exported):
    before = (exported / "partition-1" / "detector.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "tune.export", str(smoke_sweep["experiment"]),
                           "--out", str(exported)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "already holds partition-1" in proc.stderr
    assert (exported / "partition-1" / "detector.json").read_bytes() == before


@pytest.fixture(scope="module")
def partition2(exported):
    """Partition 2 (IND classes 1..6: ids differ from the head's indices 0..5)."""
    meta = json.loads((exported / "partition-2" / "detector.json").read_text())
    return make_split("same_dataset_mnist", 2, DataConfig(**meta["config"]["data"]))


def test_detector_reproduces_the_trials_scores_of_ind_and_unseen_classes(smoke_sweep, exported,
                                                                          partition2):
    detector = Detector.load(exported / "partition-2")
    scores = load_scores(smoke_sweep["experiment"], detector.meta["source"]["trial_id"])
    test = scores[(scores["partition"] == 2) & (scores["split"] == "test")]
    for images, kind in ((partition2.test_ind_x, "ind"), (partition2.test_ood_x, "ood")):
        table = detector.score(images, batch_size=50)  # batches of any size: the same scores
        expected = test[test["kind"] == kind]
        for column in ("cmg", *SCORES):
            np.testing.assert_allclose(table[column], expected[column], rtol=1e-4, atol=1e-5)
        assert (table["is_ood"] == (table["cmg"] > detector.meta["threshold"])).all()
    ind = detector.score(partition2.test_ind_x)
    accuracy = (ind["pred_class"].to_numpy() == np.array(partition2.ind_classes)[
        partition2.test_ind_y.numpy()]).mean()
    assert accuracy == pytest.approx(detector.meta["metrics"]["test_ind_acc"], abs=1e-6)
    assert set(ind["pred_name"]) <= {str(c) for c in partition2.ind_classes}


def test_score_command_reads_npy_and_image_folders_alike(exported, partition2, tmp_path, capsys):
    images = partition2.test_ind_x[:4].numpy()  # IND digits
    images = np.concatenate([images, partition2.test_ood_x[:3].numpy()])  # unseen digits
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "x3.npy", images[:, 0])  # (N, H, W)
    for i, image in enumerate(images):
        path = tmp_path / "png" / f"group{i % 2}" / "deeper" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(path)
    tables = {}
    for name in ("x.npy", "x3.npy", "png"):
        score_main([str(exported / "partition-2"), str(tmp_path / name),
                    "--out", str(tmp_path / f"{name}.csv"), "--device", "cpu"])
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv")
    assert "7 images" in capsys.readouterr().out
    assert list(tables["x.npy"].columns) == ["input", "pred_class", "pred_name", "cmg", "is_ood",
                                             *SCORES]
    assert list(tables["x.npy"]["input"]) == list(range(7))
    by_path = tables["png"].assign(index=tables["png"]["input"].str.extract(r"img(\d)")[0]
                                   .astype(int)).sort_values("index")
    assert by_path["input"].iloc[0] == "group0/deeper/img0.png"
    for other in (tables["x3.npy"], by_path.reset_index(drop=True)):
        np.testing.assert_allclose(other["cmg"], tables["x.npy"]["cmg"], rtol=1e-5, atol=1e-6)


def test_score_command_reads_a_torchvision_data_set_by_name_up_to_the_limit(
        exported, tmp_path, capsys, mnist_available):
    """`cmg.score DETECTOR MNIST --data-root ROOT --limit 5`: torchvision's own MNIST reader over
    unpacked idx files (nothing downloaded) gives the scores of the first 5 test images."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = _find_mnist_dir(resolve_data_root())
    for name in MNIST_FILES:
        path = _idx_path(source, name)
        raw.joinpath(name).write_bytes(gzip.decompress(path.read_bytes()) if path.suffix == ".gz"
                                       else path.read_bytes())
    detector = exported / "partition-2"
    table = score_main([str(detector), "MNIST", "--data-root", str(tmp_path / "root"), "--limit",
                        "5", "--out", str(tmp_path / "mnist.csv"), "--quiet"])
    assert "5 images" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "mnist.csv")["input"]) == [0, 1, 2, 3, 4]
    test_x = load_mnist(resolve_data_root())[2][:5]  # the project's own reader of the files
    expected = Detector.load(detector).score(test_x.numpy())
    np.testing.assert_allclose(table["cmg"], expected["cmg"], rtol=1e-5, atol=1e-6)


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        score_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_score_command_rejects_bad_input_in_one_line_without_a_csv(exported, tmp_path, capsys):
    detector = str(exported / "partition-2")
    out = tmp_path / "scores.csv"
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 32, 32), dtype=np.uint8))
    assert "needs 1x28x28" in _one_line_error([detector, str(tmp_path / "rgb.npy"), "--out",
                                               str(out)], capsys)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no PNG or JPEG" in _one_line_error([detector, str(tmp_path / "empty"), "--out",
                                                str(out)], capsys)
    (tmp_path / "color").mkdir()
    Image.new("RGB", (28, 28)).save(tmp_path / "color" / "a.png")
    assert "3 channel(s)" in _one_line_error([detector, str(tmp_path / "color"), "--out",
                                              str(out)], capsys)
    Image.new("L", (32, 32)).save(tmp_path / "color" / "a.png")
    assert "is 32x32" in _one_line_error([detector, str(tmp_path / "color"), "--out",
                                          str(out)], capsys)
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((exported / "partition-2" / "detector.json").read_text())
    (old / "detector.json").write_text(json.dumps({**meta, "version": 0}))
    assert "export it again" in _one_line_error([str(old), str(tmp_path / "rgb.npy"), "--out",
                                                 str(out)], capsys)
    assert not out.exists() and not list(tmp_path.glob(".scores.csv.*"))


# -- a detector with a backbone: conftest's backbone sweep ---------------------------------------

_OPENED: list[str] | None = None  # inside `opened_files`: the paths this process opened


def _record_open(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.fspath(args[0]))


@contextlib.contextmanager
def opened_files():
    """The paths this process opens inside the block (Python's audit hook: every `open`, torch's
    loads included). A hook, once added, stays for the process: outside a block it only returns."""
    global _OPENED
    if not getattr(opened_files, "hooked", False):
        sys.addaudithook(_record_open)
        opened_files.hooked = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def test_a_detector_with_a_backbone_scores_the_same_after_a_move_without_the_sweep(
        backbone_sweep, tmp_path, monkeypatch):
    """Export a CSI-backbone sweep's detector (`{partition}` in --backbone, as docs/csi.md
    recommends), move the folder elsewhere: it loads from a relative path and scores bitwise what
    it scored before the move, which is what the trial scored, and opens no file of the sweep,
    its stage-1 store, its data or the backbone it was trained with (Python's audit hook sees
    every file opened). A detector.json written before backbones were copied (the sweep's
    absolute path) still loads; one with `{partition}` in that path must be exported again."""
    from tune.export import export

    experiment, backbone = backbone_sweep["experiment"], backbone_sweep["backbone"]
    [folder] = export(str(experiment), tmp_path / "detector")
    meta = json.loads((folder / "detector.json").read_text())
    assert meta["backbone"]["path"] == "backbone.pt"  # relative to the folder: no machine's path
    assert meta["backbone"]["sweep"]["path"] == backbone_sweep["template"]
    assert (folder / "backbone.pt").read_bytes() == backbone.read_bytes()  # partition 1's file
    split = make_split("different_dataset", 1, DataConfig(**meta["config"]["data"]),
                       backbone_sweep["data_root"])
    images = torch.cat([split.test_ind_x, split.test_ood_x])
    before = Detector.load(folder).score(images)
    scores = load_scores(experiment, meta["source"]["trial_id"])
    test = scores[scores["split"] == "test"]
    assert len(test) == len(images)
    for column in ("cmg", *SCORES):  # what the trial scored, as the MNIST detector above
        np.testing.assert_allclose(before[column], test[column], rtol=1e-4, atol=1e-5)

    moved = Path(shutil.move(folder, tmp_path / "elsewhere" / "partition-1"))
    monkeypatch.chdir(moved.parent)
    with opened_files() as opened:
        after = Detector.load("partition-1").score(images)
    pd.testing.assert_frame_equal(after, before, check_exact=True)  # same files, same kernels
    assert any(p.endswith("backbone.pt") for p in opened)  # the hook sees the detector's files
    sweep = str(backbone_sweep["folder"])
    assert not [p for p in opened if os.path.abspath(p).startswith(sweep)], opened

    old = json.loads((moved / "detector.json").read_text())  # exported before the copy:
    old["backbone"]["path"] = str(moved / "backbone.pt")  # the sweep's absolute path
    (moved / "detector.json").write_text(json.dumps(old))
    pd.testing.assert_frame_equal(Detector.load(moved).score(images), before, check_exact=True)
    old["backbone"]["path"] = backbone_sweep["template"]
    (moved / "detector.json").write_text(json.dumps(old))  # hash over all partitions' files
    with pytest.raises(UsageError, match="export it again with python -m tune.export"):
        Detector.load(moved)
    (moved / "detector.json").write_text(json.dumps(meta))
    damaged = bytearray((moved / "backbone.pt").read_bytes())
    damaged[-1] ^= 1
    (moved / "backbone.pt").write_bytes(bytes(damaged))
    with pytest.raises(UsageError, match="not the file this detector was trained with"):
        Detector.load(moved)
