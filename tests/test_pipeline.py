"""End-to-end runs: the smoke pipeline on real MNIST, a short training that beats chance, the
CIFAR path on synthetic 3x32x32 data, and stage 2's guarantees."""

import math

import pytest
import torch

from cmg.config import RunConfig, Stage2Config, budget_config, resolve_family_defaults
from cmg.results import BASELINES, HEAD_BASELINES, METRIC_NAMES
from cmg.pipeline import flat_metrics, load_partition, run_partition
from cmg.stage1 import train_classifier, train_cvae
from cmg.stage2 import run_stage2


def stage2_config(**knobs) -> Stage2Config:
    """A hand-made MNIST stage-2 config, its family defaults resolved as budget_config does."""
    return resolve_family_defaults(RunConfig(stage2=Stage2Config(**knobs)), "mnist").stage2


def check_metrics(m):
    for part in ("val", "test"):
        assert set(m[part]) == set(METRIC_NAMES)
        for name in ("msp", "energy", "maxlogit"):
            assert set(m["baselines"][name][part]) == set(METRIC_NAMES)
        assert all(0 <= v <= 1 for v in m[part].values())


@pytest.mark.slow
def test_smoke_pipeline_on_real_mnist(mnist_available, tmp_path):
    cfg = budget_config("smoke")
    m = run_partition(load_partition("same_dataset_mnist", 1, cfg, "cpu"), cfg,
                      workdir=tmp_path, budget="smoke", quiet=True)
    check_metrics(m)
    assert set(m["seconds"]) == {"classifier", "cvae", "stage2"}
    assert (tmp_path / "classifier.pt").is_file() and (tmp_path / "cvae.pt").is_file()


@pytest.mark.slow
def test_short_real_training_beats_chance(mnist_available):
    cfg = budget_config("smoke", overrides=[
        "classifier.epochs=2", "classifier.lr=3e-3", "classifier.schedule=onecycle",
        "data.train_limit=600", "data.eval_limit=200", "cvae.epochs=2", "stage2.epochs=2"])
    m = run_partition(load_partition("same_dataset_mnist", 3, cfg, "cpu"), cfg, quiet=True)
    assert m["test"]["ind_acc"] > 0.8  # chance is 1/6
    assert m["test"]["auroc"] > 0.75 and m["baselines"]["msp"]["test"]["auroc"] > 0.75


@pytest.mark.slow
def test_cifar_path_on_synthetic_images_in_both_modes(tmp_path):
    """ResNet-18 stage 1 trained once, then stage 2 in each mode on it (the workdir's finished
    checkpoints are reused, not rewritten): every metric of both modes, margins in energy only."""
    overrides = ["data.train_limit=96", "data.eval_limit=32", "classifier.batch_size=48",
                 "cvae.batch_size=48"]
    stamps = []
    for mode in ("CMG-energy", "CMG-softmax"):
        cfg = budget_config("smoke", "cifar", [f"stage2.mode={mode}", *overrides])
        m = run_partition(load_partition("synthetic_cifar10", 2, cfg, "cpu"), cfg,
                          workdir=tmp_path, quiet=True)
        check_metrics(m)
        assert m["mode"] == mode and (m["stage2"]["margins"] != {}) == (mode == "CMG-energy")
        stamps.append({k: (tmp_path / f"{k}.pt").stat().st_mtime_ns for k in ("classifier", "cvae")})
    assert stamps[0] == stamps[1]  # stage 1 trained by the first mode only


@pytest.fixture(scope="module")
def trained(mnist_available):
    cfg = budget_config("smoke", overrides=["data.train_limit=192", "data.eval_limit=64"])
    split = load_partition("same_dataset_mnist", 5, cfg, "cpu")
    clf, _ = train_classifier(split, cfg.classifier, quiet=True)
    cvae, _ = train_cvae(split, cfg.cvae, quiet=True)
    return split, clf, cvae


def test_stage2_leaves_the_stage1_model_unchanged(trained):
    split, clf, cvae = trained
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    result = run_stage2(clf, cvae, split, stage2_config(epochs=2, batch_size=64), quiet=True)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    assert len(result.history) == 2 and result.selected_epoch in (1, 2)
    # the selected head is the one with the best validation AUROC, and is what val reports
    best = max(h["val_auroc"] for h in result.history)
    assert result.val["auroc"] == pytest.approx(best)


def test_stage2_generates_with_exactly_the_configs_sigma(trained, monkeypatch):
    """Stage 2 resolves nothing: the generator gets cfg.sigma, and a config whose sigma was never
    resolved (not built by budget_config) is refused."""
    import cmg.stage2
    from cmg.generate import generate_pseudo_ood

    split, clf, cvae = trained
    seen = []

    def recording(cvae, n, cfg, sigma, generator):
        seen.append(sigma)
        return generate_pseudo_ood(cvae, n, cfg, sigma, generator)

    monkeypatch.setattr(cmg.stage2, "generate_pseudo_ood", recording)
    run_stage2(clf, cvae, split, stage2_config(epochs=1, batch_size=64, sigma=2.25), quiet=True)
    assert seen and set(seen) == {2.25}
    seen.clear()
    run_stage2(clf, cvae, split, budget_config("smoke").stage2, quiet=True)
    assert seen and set(seen) == {3.0}
    with pytest.raises(ValueError, match="budget_config"):
        run_stage2(clf, cvae, split, Stage2Config(epochs=1), quiet=True)


def test_stage2_select_last_and_fixed_margins(trained):
    split, clf, cvae = trained
    cfg = stage2_config(epochs=2, batch_size=64, select="last", m_in=-7.0, m_out=-1.0)
    result = run_stage2(clf, cvae, split, cfg, quiet=True)
    assert result.selected_epoch == 2 and result.margins == {"m_in": -7.0, "m_out": -1.0}
    assert result.val["auroc"] == pytest.approx(result.history[-1]["val_auroc"])
    assert math.isfinite(result.test["auroc"])


@pytest.mark.parametrize("arm", ["single", "noise", "none"])
def test_every_control_arm_runs_on_the_same_models_and_scores_its_own_head(trained, arm):
    """Each arm fine-tunes the same head of the same stage-1 models; besides CMG's score, the
    baselines are scored on the selected stage-2 head too (`head_*`), and CMG-energy's own score
    is the stage-2 head's energy. Without pseudo-OOD there are no margins to set."""
    split, clf, cvae = trained
    cfg = stage2_config(epochs=2, batch_size=64, pseudo_ood=arm)
    result = run_stage2(clf, cvae, split, cfg, quiet=True)
    assert set(result.baselines) == {*BASELINES, *HEAD_BASELINES}
    for part in ("val", "test"):
        assert result.baselines["head_energy"][part] == pytest.approx(getattr(result, part))
    assert (result.margins == {}) == (arm == "none")
    mixed = run_stage2(clf, cvae, split, stage2_config(epochs=2, batch_size=64), quiet=True)
    assert result.baselines["msp"] == mixed.baselines["msp"]  # the same stage-1 head
    assert any(not torch.equal(result.head[k], mixed.head[k]) for k in mixed.head)  # other data
    flat = flat_metrics({"val": result.val, "test": result.test, "baselines": result.baselines})
    assert {f"head_maxlogit_{part}_auroc" for part in ("val", "test")} <= set(flat)
