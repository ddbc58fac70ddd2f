"""Shapes and sizes of every model, for both families, and the CVAE loss's value."""

import math

import pytest
import torch

from cmg.config import CVAEConfig, ClassifierConfig
from cmg.models import build_classifier, build_cvae, cvae_loss

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_classifier_shapes(family):
    model = build_classifier(family, 6, ClassifierConfig(head_width=64)).eval()
    x = torch.rand(3, *SHAPES[family])
    assert model.features(x).shape == (3, model.features.out_dim)
    assert model(x).shape == (3, 7)  # 6 IND classes + the OOD slot
    assert model.head.hidden.out_features == 64


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_cvae_shapes_and_loss(family):
    cfg = CVAEConfig(latent_dim=8, embed_dim=5)
    cvae = build_cvae(family, 6, cfg)
    x, y = torch.rand(4, *SHAPES[family]), torch.tensor([0, 1, 2, 5])
    recon, mu, logvar = cvae(x, y)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (4, 8)
    assert 0 <= recon.min() and recon.max() <= 1
    assert cvae.class_embeddings().shape == (6, 5)  # one-hot over K = 6 columns (defect 6)
    assert cvae.decode(torch.zeros(2, 8), cvae.class_embeddings()[:2]).shape == (2, *SHAPES[family])
    assert cvae_loss(x, recon, mu, logvar).ndim == 0


def test_cvae_loss_is_pixel_mse_plus_weighted_kl_per_pixel():
    """On inputs with known terms: reconstruction 0.5 everywhere for black images (MSE 0.25);
    posteriors N(1, 4) and N(0, 4) in 8 latent dimensions, whose KL to N(0, 1) is
    8 * (var + mu^2 - 1 - ln var) / 2 each, averaged over the batch and divided by the 784
    pixels of an image."""
    x, recon = torch.zeros(2, 1, 28, 28), torch.full((2, 1, 28, 28), 0.5)
    mu = torch.tensor([[1.0] * 8, [0.0] * 8])
    logvar = torch.full((2, 8), math.log(4.0))
    kl = (8 * (4 + 1 - 1 - math.log(4)) / 2 + 8 * (4 + 0 - 1 - math.log(4)) / 2) / 2 / 784
    assert float(cvae_loss(x, recon, mu, logvar)) == pytest.approx(0.25 + kl, rel=1e-6)
    assert float(cvae_loss(x, recon, mu, logvar, kl_weight=3.0)) == pytest.approx(
        0.25 + 3 * kl, rel=1e-6)
    assert float(cvae_loss(x, x, torch.zeros(2, 8), torch.zeros(2, 8))) == 0.0  # both terms 0


def test_parameter_counts_match_the_reference():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_classifier("mnist", 6)) == pytest.approx(2.05e6, rel=0.01)
    assert count(build_classifier("cifar", 6)) == pytest.approx(11.4e6, rel=0.01)
    assert count(build_cvae("cifar", 6)) == pytest.approx(33.9e6, rel=0.001)


def _weights(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in module.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]


def test_the_cvaes_are_the_references_layer_for_layer():
    """Every conv and linear layer of the reference's CVAEs (models/vae.py, models/conv/nets.py
    of the CMG code) with K = 6 one-hot columns (defect 6) and, for MNIST, padding 1 (defect 4:
    28 -> 14 -> 7 instead of 28 -> 28 -> 28, whose first Linear had 128 x 28 x 28 inputs)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mnist = build_cvae("mnist", 6)
    assert _weights(mnist) == [
        (64, 1, 4, 4), (128, 64, 4, 4),  # encoder, ReLU after each
        (1024, 128 * 7 * 7), (32, 1024), (32, 1024),  # fcE, mu, logvar
        (32, 6),  # class embedding: the latent size, over K one-hot columns
        (1024, 64), (128 * 7 * 7, 1024),  # fromZ (z and embedding), fcD
        (128, 64, 4, 4), (64, 1, 4, 4)]  # decoder: 7 -> 14 -> 28
    assert count(mnist) == 13_249_185
    cifar = build_cvae("cifar", 6)
    assert _weights(cifar.decoder) == [(512, 512, 3, 3), (512, 512, 1, 1)] * 2 + [
        (512, 512, 4, 4), (512, 512, 4, 4), (512, 3, 4, 4)]  # 4 -> 8 -> 16 -> 32
    assert _weights(cifar)[-10:-5] == [(32, 6), (1024, 64), (512 * 4 * 4, 1024),
                                        (512, 512, 3, 3), (512, 512, 1, 1)]
    assert count(cifar) == 33_888_611
    # the embedding follows the latent size unless set
    assert build_cvae("mnist", 6, CVAEConfig(latent_dim=16)).class_embeddings().shape == (6, 16)
    x = torch.rand(2, 512 * 4 * 4)
    assert cifar.decoder(x).shape == (2, 3, 32, 32) and mnist.decoder(x[:, :6272]).shape == (
        2, 1, 28, 28)


def test_input_dropout_flag_restores_the_reference_layer():
    has_first = lambda m: isinstance(m.features.net[0], torch.nn.Dropout2d)  # noqa: E731
    assert not has_first(build_classifier("mnist", 6))
    assert has_first(build_classifier("mnist", 6, ClassifierConfig(input_dropout=True)))


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_channels_last_gives_the_same_logits_as_the_default_layout(family):
    """Stage 2 runs the frozen network channels-last (cmg.stage2._frozen): a layout change, not
    a different function."""
    torch.manual_seed(0)
    model = build_classifier(family, 6).eval()
    x = torch.rand(5, *SHAPES[family])
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (5, 7) and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
