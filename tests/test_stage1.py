"""Stage-1 training: resumable checkpoints, safe loading, divergence."""

import os

import pytest
import torch

from cmg.checkpoint import load_checkpoint
from cmg.config import ClassifierConfig, CVAEConfig, DataConfig
from cmg.data import make_split
from cmg.errors import UsageError
from cmg.stage1 import TrainingDiverged, load_stage1_model, train_classifier, train_cvae

CLF = ClassifierConfig(epochs=2, batch_size=32, schedule="onecycle", head_width=32)


@pytest.fixture(scope="module")
def split(mnist_available):
    return make_split("same_dataset_mnist", 2, DataConfig(train_limit=96, eval_limit=32))


class Interrupt(Exception):
    pass


def stop_after_first_epoch(epoch, metrics):
    if epoch == 1:
        raise Interrupt


def test_interrupted_training_resumes_to_the_same_weights(split, tmp_path):
    straight, history = train_classifier(split, CLF, quiet=True)
    assert [h["epoch"] for h in history] == [1, 2]
    path = tmp_path / "clf.pt"
    with pytest.raises(Interrupt):
        train_classifier(split, CLF, checkpoint=path, callback=stop_after_first_epoch, quiet=True)
    state = load_checkpoint(path, "classifier")
    assert state["epoch"] == 1 and "optimizer" in state  # what resumes it
    seen = []
    resumed, _ = train_classifier(split, CLF, checkpoint=path,
                                  callback=lambda e, m: seen.append(e), quiet=True)
    assert seen == [2]  # only the missing epoch ran
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # done: the checkpoint keeps the weights alone, and the same command again trains nothing
    assert "optimizer" not in load_checkpoint(path, "classifier")
    again, _ = train_classifier(split, CLF, checkpoint=path,
                                callback=lambda e, m: seen.append(e), quiet=True)
    assert seen == [2]
    for a, b in zip(straight.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_is_plain_data_and_reloads(split, tmp_path):
    path = tmp_path / "cvae.pt"
    cvae, _ = train_cvae(split, CVAEConfig(epochs=1, batch_size=48, latent_dim=4), checkpoint=path,
                         quiet=True)
    state = torch.load(path, weights_only=True)  # no pickled code inside
    assert state["kind"] == "cvae" and state["config"]["latent_dim"] == 4
    again = load_stage1_model(path, "cvae", split)
    for a, b in zip(cvae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_errors_are_usage_errors(split, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="corrupt"):
        load_stage1_model(corrupt, "classifier")
    with pytest.raises(UsageError, match="does not exist"):
        load_stage1_model(tmp_path / "missing.pt", "classifier")
    path = tmp_path / "clf.pt"
    train_classifier(split, ClassifierConfig(epochs=1, batch_size=48, head_width=16),
                     checkpoint=path, quiet=True)
    with pytest.raises(UsageError, match="holds a classifier"):
        load_stage1_model(path, "cvae")
    with pytest.raises(UsageError, match="another setting, partition or config"):
        train_classifier(split, ClassifierConfig(epochs=1, batch_size=48, head_width=8),
                         checkpoint=path, quiet=True)
    other = make_split("same_dataset_mnist", 3, DataConfig(train_limit=12, eval_limit=4))
    with pytest.raises(UsageError, match="partition 2, not same_dataset_mnist partition 3"):
        load_stage1_model(path, "classifier", other)


def test_divergence_raises_a_clear_error(split):
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_classifier(split, ClassifierConfig(epochs=2, batch_size=48, lr=1e30), quiet=True)


@pytest.mark.slow
@pytest.mark.numerics
def test_compiled_cvae_training_computes_what_eager_training_computes(split):
    """`--compile` changes how fast stage 1 trains, not what: with the same random numbers as
    eager mode (inductor's fallback_random), one step moves the weights alike, and two epochs give
    the same losses and a CVAE that computes the same. Compiled and eager kernels round
    differently, by CPU, so each bound is the largest difference measured on this machine under
    ATEN_CPU_CAPABILITY avx512, avx2 and default, times about ten. Weights after several steps
    are not compared: Adam moves a weight whose gradient is ~0 by about lr x sign(gradient), so
    rounding there grows to ~lr per step (6 steps: 7.5e-4 here, 2.8e-4 on a Zen 3 AVX2 CPU)."""
    from torch._dynamo.utils import counters

    from cmg.data import to_float

    def eager_and_compiled(cfg):
        eager = train_cvae(split, cfg, quiet=True)
        counters.clear()
        with torch._inductor.config.patch(fallback_random=True):
            compiled = train_cvae(split, cfg, quiet=True, compile_model=True)
        assert counters["stats"]["unique_graphs"] >= 1  # the training steps really were compiled
        return eager, compiled

    one_step = CVAEConfig(epochs=1, batch_size=len(split.train_x), hidden=64, latent_dim=8)
    (eager, _), (compiled, _) = eager_and_compiled(one_step)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # measured: 1.5e-6

    two_epochs = CVAEConfig(epochs=2, batch_size=32, hidden=64, latent_dim=8)
    (eager, eager_history), (compiled, compiled_history) = eager_and_compiled(two_epochs)
    assert [h["loss"] for h in compiled_history] == pytest.approx(
        [h["loss"] for h in eager_history], rel=1e-5)  # measured: 1.8e-7
    x, y = to_float(split.train_x), split.train_y
    with torch.no_grad():
        torch.manual_seed(1)
        recon_eager, mu_eager, _ = eager.eval()(x, y)
        torch.manual_seed(1)
        recon_compiled, mu_compiled, _ = compiled.eval()(x, y)
    torch.testing.assert_close(recon_compiled, recon_eager, rtol=0, atol=1e-3)  # measured: 6.3e-5
    torch.testing.assert_close(mu_compiled, mu_eager, rtol=0, atol=1e-3)  # measured: 7.8e-5
    assert type(compiled).__name__ == "CVAE"  # the plain module is returned: inference is eager


def test_compiled_kernels_are_cached_per_cpu_capability(monkeypatch, tmp_path):
    """Inductor's disk cache ignores ATEN_CPU_CAPABILITY (AVX-512 kernels reloaded under avx2
    trained to NaN here): maybe_compile gives each capability its own folder, a chosen one stays."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from cmg.precision import maybe_compile

    model = torch.nn.Linear(2, 2)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert maybe_compile(model, False) is model
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # eager runs leave inductor alone
    maybe_compile(model, True)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(default_cache_dir(), capability)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    maybe_compile(model, True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
