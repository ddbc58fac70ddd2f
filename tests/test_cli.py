"""Command lines as a user runs them: the reference's commands, and every bad input exits 2 with
one line on stderr, no traceback, and no partial files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--budget", "smoke", "--quiet", "--device", "cpu"]


def cli(module, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_usage_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("args, words", [
    (["--setting", "nope"], ["unknown setting", "same_dataset_mnist"]),
    (["--mode", "CMG-magic"], ["unknown mode", "CMG-energy"]),
    (["--partition", "0"], ["partition 0", "1, 2, 3, 4, 5"]),
    (["--partition", "6"], ["partition 6"]),
    (["--budget", "huge"], ["--budget", "smoke"]),
    (["--set", "stage2.sigmaa=3"], ["stage2.sigmaa"]),
    (["--set", "stage2.epochs=abc"], ["stage2.epochs", "an integer", "'abc'"]),
    (["--setting", "same_dataset_cifar10", "--data-root", "/nonexistent"],
     ["--download", "/nonexistent", "synthetic_cifar10"]),
    (["--setting", "no_such_module:mine"], ["cannot import setting module 'no_such_module'"]),
    (["--setting", "cmg.config:mine"], ["module 'cmg.config' registers no setting 'mine'"]),
    (["--setting-module", "no_such_module"], ["no_such_module", "--setting-module"]),
])
def test_run_bad_input(tmp_path, args, words):
    out = tmp_path / "out"
    assert_usage_error(run_main("cmg.run", *args, "--out", str(out), *SMOKE), *words)
    assert not (out / "metrics.json").exists()


def test_run_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_usage_error(run_main("cmg.run", "--out", str(blocker / "sub"), *SMOKE), "--out")


def test_eval_missing_and_corrupt_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    out = tmp_path / "m.json"
    common = ["--task", "same_dataset_mnist", "--partition", "partition1", "--out", str(out)]
    proc = run_main("cmg.eval", *common, "--params-dict-name", str(tmp_path / "missing.pt"),
                    "--params-dict-name2", str(corrupt), *SMOKE)
    assert_usage_error(proc, "does not exist", "cmg.train")
    proc = run_main("cmg.eval", *common, "--params-dict-name", str(corrupt),
                    "--params-dict-name2", str(corrupt), *SMOKE)
    assert_usage_error(proc, "corrupt")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["corrupt.pt"]


@pytest.mark.slow
def test_reference_commands_train_then_eval(mnist_available, tmp_path):
    clf, cvae, out = tmp_path / "main_model_p2.pt", tmp_path / "cvae_p2.pt", tmp_path / "m.json"
    base = ["--task", "same_dataset_mnist", "--partition", "partition2", *SMOKE]
    assert run_main("cmg.train", *base, "--command", "train_classifier",
                    "--params-dict-name", str(clf)).returncode == 0
    assert run_main("cmg.train", *base, "--command", "train_cvae",
                    "--params-dict-name", str(cvae)).returncode == 0
    proc = run_main("cmg.eval", *base, "--mode", "CMG-softmax", "--params-dict-name", str(clf),
                    "--params-dict-name2", str(cvae), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "max-softmax" in proc.stdout and json.loads(out.read_text())["mode"] == "CMG-softmax"
    swapped = run_main("cmg.eval", *base, "--params-dict-name", str(cvae),
                       "--params-dict-name2", str(clf))
    assert_usage_error(swapped, "holds a cvae")


@pytest.mark.slow
def test_run_writes_metrics_json(mnist_available, tmp_path):
    proc = run_main("cmg.run", "--setting", "same_dataset_mnist", "--partition", "partition4",
                    "--mode", "CMG-energy", "--out", str(tmp_path), "--set", "stage2.sigma=2.5",
                    *SMOKE)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m) >= {"setting", "partition", "mode", "budget", "config", "val", "test",
                      "baselines", "seconds"}
    assert (m["partition"], m["budget"], m["config"]["stage2"]["sigma"]) == (4, "smoke", 2.5)
    assert set(m["val"]) == {"auroc", "aupr_in", "aupr_out", "fpr95", "ind_acc"}
    # the stage-1 head's baselines, and the same scores of the selected stage-2 head
    assert set(m["baselines"]) == {"msp", "energy", "maxlogit", *(f"head_{b}" for b in (
        "msp", "energy", "maxlogit"))}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("module", ["cmg.run", "cmg.train", "cmg.eval"])
def test_help_lists_every_option_with_its_default(module):
    proc = run_main(module, "--help")
    assert proc.returncode == 0
    for option in ("--budget", "--device", "--data-root", "--download", "--seed", "--quiet",
                   "--set"):
        assert option in proc.stdout
    assert "(default: quick)" in proc.stdout


@pytest.mark.parametrize("override, words", [
    ("stage2.epochs=abc", ["stage2.epochs takes an integer", "'abc'"]),
    ("stage2.epochs=2.5", ["stage2.epochs takes an integer", "'2.5'"]),
    ("stage2.lr=fast", ["stage2.lr takes a number", "'fast'"]),
    ("stage2.sigma=big", ["stage2.sigma takes a number or none", "'big'"]),
    ("data.train_limit=all", ["data.train_limit takes an integer or none", "'all'"]),
    ("classifier.amp=maybe", ["classifier.amp takes true or false", "'maybe'"]),
    ("stage2.epochs=none", ["stage2.epochs takes an integer", "'none'"]),
])
def test_set_is_type_checked_against_the_field(override, words):
    from cmg.config import budget_config
    from cmg.errors import UsageError

    with pytest.raises(UsageError) as err:
        budget_config("smoke", "mnist", [override])
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_set_parses_every_field_type():
    from cmg.config import budget_config

    cfg = budget_config("smoke", "mnist", [
        "stage2.epochs=3", "stage2.lr=2e-4", "stage2.sigma=4", "stage2.m_in=none",
        "data.train_limit=100", "data.eval_limit=null", "classifier.amp=false",
        "data.augment=TRUE", "stage2.mode=CMG-softmax"])
    s2 = cfg.stage2
    assert (s2.epochs, s2.lr, s2.sigma, s2.m_in, s2.mode) == (3, 2e-4, 4.0, None, "CMG-softmax")
    assert isinstance(s2.sigma, float) and isinstance(s2.epochs, int)
    assert (cfg.data.train_limit, cfg.data.eval_limit) == (100, None)
    assert (cfg.classifier.amp, cfg.data.augment) == (False, True)


def test_budget_config_holds_the_family_sigma_and_an_override_wins():
    """stage2.sigma is resolved when the config is built, so trial.json records the value used;
    an old record with sigma null still loads."""
    from cmg.config import DEFAULT_SIGMA, RunConfig, budget_config

    assert budget_config("quick", "mnist").stage2.sigma == DEFAULT_SIGMA["mnist"] == 3.0
    assert budget_config("quick", "cifar").stage2.sigma == DEFAULT_SIGMA["cifar"] == 5.0
    assert budget_config("quick", "cifar", ["stage2.sigma=1.5"]).stage2.sigma == 1.5
    assert budget_config("quick", "mnist", ["stage2.sigma=none"]).stage2.sigma == 3.0
    old = budget_config("smoke").to_dict()
    old["stage2"]["sigma"] = None
    assert RunConfig.from_dict(old).stage2.sigma is None


def test_download_without_network_is_one_line(tmp_path, monkeypatch, capsys):
    """torchvision's real download code runs; only the network is faked away."""
    import urllib.error
    import urllib.request

    from cmg.run import main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root, out = tmp_path / "data", tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--setting", "same_dataset_cifar10", "--download", "--data-root", str(root),
              "--out", str(out), *SMOKE])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--download could not fetch CIFAR-10" in err[0] and "name resolution" in err[0]
    assert "drop --download" in err[0] and str(root) in err[0]
    assert not (out / "metrics.json").exists()
