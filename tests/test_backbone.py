"""External backbones: a checkpoint in CSI's layout (randomly initialised) loads strictly, computes
what CSI's ResNet-18 computes, runs stage 2 end to end, and stays bitwise frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from cifar_data import build_cifar_data_root
from cmg.backbone import BackboneSpec, CsiResNet18Features, load_backbone
from cmg.config import budget_config
from cmg.errors import UsageError
from cmg.pipeline import load_partition
from cmg.stage2 import run_stage2
from cmg.stage1 import train_cvae
from conftest import run_main
from test_cli import SMOKE, assert_usage_error, cli


def csi_state_dict(seed: int = 0, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """What CSI's `torch.save(model.state_dict())` holds for its labelled CIFAR ResNet-18 (here
    randomly initialised, with BatchNorm statistics that are not the defaults), as saved from
    DataParallel: every key prefixed with `module.`."""
    torch.manual_seed(seed)
    features = CsiResNet18Features()
    state = dict(features.state_dict())
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = torch.rand_like(value) + (0.5 if key.endswith("var") else -0.5)
    heads = {"linear": (512, num_classes), "simclr_layer.0": (512, 512),
             "simclr_layer.2": (512, 128), "shift_cls_layer": (512, 2),
             "joint_distribution_layer": (512, 4 * num_classes)}
    for name, (cin, cout) in heads.items():
        state[f"{name}.weight"] = torch.randn(cout, cin) * 0.05
        state[f"{name}.bias"] = torch.randn(cout) * 0.05
    return {f"module.{k}": v for k, v in state.items()}


def csi_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CSI's ResNet-18 written out from its state dict alone: normalise, 3x3 stem, four stages of
    two BasicBlocks (ReLU), 4x4 average pool, `linear`."""
    s = {k.removeprefix("module."): v for k, v in state.items()}

    def bn(x, p):
        return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"],
                            s[f"{p}.bias"], training=False)

    out = F.relu(bn(F.conv2d((x - 0.5) / 0.5, s["conv1.weight"], padding=1), "bn1"))
    for layer, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for block in range(2):
            p = f"layer{layer}.{block}"
            step = stride if block == 0 else 1
            y = F.relu(bn(F.conv2d(out, s[f"{p}.conv1.weight"], stride=step, padding=1),
                          f"{p}.bn1"))
            y = bn(F.conv2d(y, s[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = (bn(F.conv2d(out, s[f"{p}.shortcut.0.weight"], stride=step),
                        f"{p}.shortcut.1") if f"{p}.shortcut.0.weight" in s else out)
            out = F.relu(y + short)
    return F.linear(F.avg_pool2d(out, 4).flatten(1), s["linear.weight"], s["linear.bias"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_cifar_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def csi_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("csi") / "last.model"
    torch.save(csi_state_dict(), path)
    return path


def test_csi_checkpoint_computes_what_csi_computes(csi_checkpoint):
    model = load_backbone(csi_checkpoint, "csi", num_classes=10)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        expected = csi_forward(torch.load(csi_checkpoint, weights_only=True), x)
    assert logits.shape == (4, 11)  # ten CIFAR-10 classes and CMG's OOD class
    torch.testing.assert_close(logits[:, :10], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[:, 10], torch.zeros(4))  # the new OOD row starts at zero


def test_a_renamed_key_is_a_one_line_error_naming_it(csi_checkpoint, data_root, tmp_path):
    state = torch.load(csi_checkpoint, weights_only=True)
    state["module.layer2.0.bn1.wieght"] = state.pop("module.layer2.0.bn1.weight")
    broken = tmp_path / "renamed.model"
    torch.save(state, broken)
    with pytest.raises(UsageError, match=r"missing keys \['layer2\.0\.bn1\.weight'\].*"
                                         r"unexpected keys \['layer2\.0\.bn1\.wieght'\]"):
        load_backbone(broken, "csi", num_classes=10)
    proc = run_main("cmg.run", "--setting", "different_dataset", "--backbone", str(broken),
                    "--backbone-format", "csi", "--data-root", str(data_root),
                    "--out", str(tmp_path / "out"), *SMOKE)
    assert_usage_error(proc, "layer2.0.bn1.wieght", "--backbone-format")


@pytest.mark.slow
def test_stage2_leaves_the_backbone_bitwise_frozen(csi_checkpoint, data_root):
    cfg = budget_config("smoke", "cifar", ["cvae.batch_size=100", "stage2.epochs=2",
                                           "data.train_limit=100", "data.eval_limit=32"])
    split = load_partition("different_dataset", 1, cfg, "cpu", data_root)
    model = load_backbone(csi_checkpoint, "csi", num_classes=10)
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    head_before = model.head.out.weight.clone()
    model.train()  # whatever a caller does, the backbone stays in eval mode
    assert not model.features.training and not model.features.net.bn1.training
    cvae, _ = train_cvae(split, cfg.cvae, quiet=True)
    result = run_stage2(model, cvae, split, cfg.stage2, quiet=True)
    after = model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert torch.equal(model.head.out.weight, head_before)  # stage 2 trains a copy of the head
    assert not torch.equal(result.head["out.weight"], head_before)
    assert 0 <= result.test["auroc"] <= 1


@pytest.mark.slow
def test_run_with_a_csi_backbone_trains_only_the_cvae(csi_checkpoint, data_root, tmp_path):
    proc = cli("cmg.run", "--setting", "different_dataset", "--backbone", str(csi_checkpoint),
               "--backbone-format", "csi", "--data-root", str(data_root), "--out", str(tmp_path),
               *SMOKE, "--set", "cvae.batch_size=100", "--set", "data.train_limit=100",
               "--set", "data.eval_limit=32")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["seconds"]) == {"cvae", "stage2"}
    assert metrics["backbone"]["format"] == "csi" and len(metrics["backbone"]["sha256"]) == 64
    assert not (tmp_path / "classifier.pt").exists() and (tmp_path / "cvae.pt").exists()
    assert list(metrics["test"]["ood_sets"]) == ["LSUN", "tinyImageNet", "CIFAR100"]


def test_torchvision_resnet18_gets_a_new_head_and_strict_keys(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    good, bad = tmp_path / "tv.pt", tmp_path / "tv-bad.pt"
    torch.save(state, good)
    torch.save({k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}, bad)
    model = load_backbone(good, "torchvision", num_classes=10)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 11)
    assert not any(p.requires_grad for p in model.features.parameters())
    with pytest.raises(UsageError, match=r"missing keys \['layer4\.1\.bn2\.running_var'\]"):
        load_backbone(bad, "torchvision", num_classes=10)


def test_a_cmg_classifier_checkpoint_is_a_backbone(mnist_available, tmp_path):
    from cmg.stage1 import train_classifier

    cfg = budget_config("smoke", overrides=["data.train_limit=96", "data.eval_limit=16"])
    split = load_partition("same_dataset_mnist", 2, cfg, "cpu")
    trained, _ = train_classifier(split, cfg.classifier, "cpu", tmp_path / "c.pt", quiet=True)
    model = load_backbone(tmp_path / "c.pt", "cmg", num_classes=6, family="mnist")
    x = split.test_ind_x[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))
    with pytest.raises(UsageError, match="has 6 classes, the setting 10"):
        load_backbone(tmp_path / "c.pt", "cmg", num_classes=10, family="mnist")


def test_the_classifier_key_includes_the_backbone_files_hash(csi_checkpoint, tmp_path):
    from tune.artifacts import classifier_key, cvae_key

    other = tmp_path / "other.model"
    torch.save(csi_state_dict(seed=1), other)
    cfg = budget_config("smoke", "cifar")
    keys = {classifier_key("different_dataset", 1, cfg, BackboneSpec.from_args(p, "csi"))
            for p in (csi_checkpoint, other)}
    assert len(keys | {classifier_key("different_dataset", 1, cfg)}) == 3
    assert cvae_key("different_dataset", 1, cfg) not in keys  # the CVAE's key has no backbone
