"""The lines that make CMG CMG, pinned in-process in milliseconds: the energy loss computed by hand,
the margins as numpy percentiles, one fine-tuning step's direction in both modes, CMG-softmax's
extra class, stage 2's cross-entropy smoothed as stage 1's, sigma at generation, and who may take
over a stage-1 lease.

    .venv/bin/python -m pytest -q -n 0 -m method
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cmg.config import CVAEConfig, RunConfig, Stage2Config, budget_config
from cmg.generate import generate_pseudo_ood
from cmg.metrics import energy_score, softmax_ood_score
from cmg.models.classifier import Head
from cmg.models.cvae import CVAE, MnistDecoder, MnistEncoder
from cmg.stage2 import _energy_loss, energy_margins, ood_target, run_stage2, step_loss
from tune.leases import GRANTED, HELD, LEASE_SECONDS, PUBLISHED, LeaseTable

pytestmark = pytest.mark.method

K = 6  # IND classes; the heads have K + 1 outputs, the last (index K) is CMG-softmax's OOD class


def numpy_energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp over the K IND logits, in float64 (the OOD slot never counts)."""
    ind = logits[:, :K].astype(np.float64)
    top = ind.max(axis=1)
    return -(top + np.log(np.exp(ind - top[:, None]).sum(axis=1)))


def test_energy_loss_is_the_two_squared_hinges_computed_by_hand():
    # energies -log(6 e^0) = -1.792, -log(e^4 + 5 e^0) = -4.088, -log(6 e^-1) = -0.792; the OOD
    # slot (last column) is ignored
    logits_in = torch.tensor([[0.0] * 6 + [9.0], [4.0] + [0.0] * 5 + [9.0], [-1.0] * 6 + [9.0]])
    logits_out = torch.tensor([[0.0] * 6 + [-9.0], [2.0, 1.0] + [0.0] * 4 + [3.0],
                               [-3.0] * 6 + [0.0]])
    m_in, m_out = -2.0, -1.0
    e_in, e_out = numpy_energy(logits_in.numpy()), numpy_energy(logits_out.numpy())
    assert e_in == pytest.approx([-np.log(6), -np.log(np.e ** 4 + 5), -np.log(6 / np.e)])
    # IND above m_in is penalised (rows 0 and 2), IND below it is not (row 1); pseudo-OOD below
    # m_out is penalised (rows 0 and 1), above it is not (row 2)
    by_hand = (np.maximum(e_in - m_in, 0) ** 2).mean() + (np.maximum(m_out - e_out, 0) ** 2).mean()
    assert (e_in > m_in).tolist() == [True, False, True]
    assert (e_out < m_out).tolist() == [True, True, False]
    loss = _energy_loss(logits_in, logits_out, K, m_in, m_out)
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # (0.208^2 + 0 + 1.208^2) / 3 + (0.792^2 + 1.647^2 + 0) / 3 = 0.5010 + 1.1129
    assert float(loss) == pytest.approx(1.6139, abs=1e-3)


@pytest.fixture(scope="module")
def toy():
    """Fixed features: K well-separated IND classes, pseudo-OOD features between two classes (as
    class-mixed generation places them), and a stage-1 head trained on the IND features (the
    tests step copies of it)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centers = torch.randn(K, 16, generator=g) * 3
    labels = torch.arange(120) % K
    ind = centers[labels] + torch.randn(120, 16, generator=g)
    pairs = torch.rand(120, K, generator=g).argsort(dim=1)[:, :2]
    ood = centers[pairs].mean(dim=1) + torch.randn(120, 16, generator=g)
    head = Head(16, 32, K + 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        loss = F.cross_entropy(head(ind), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head, ind, labels, ood


def test_margins_are_numpy_percentiles_of_the_stage1_energies(toy):
    head, ind, _, ood = toy
    with torch.no_grad():
        e_in, e_gen = numpy_energy(head(ind).numpy()), numpy_energy(head(ood).numpy())
    cfg = Stage2Config(m_in_percentile=20, m_out_percentile=80)
    margins = energy_margins(head, ind, ood, K, cfg)
    assert margins["m_in"] == pytest.approx(np.percentile(e_in, 20), rel=1e-5)
    assert margins["m_out"] == pytest.approx(np.percentile(e_gen, 80), rel=1e-5)
    other = energy_margins(head, ind, ood, K, Stage2Config(m_in_percentile=35, m_out_percentile=60))
    assert other["m_in"] == pytest.approx(np.percentile(e_in, 35), rel=1e-5)
    assert other["m_out"] == pytest.approx(np.percentile(e_gen, 60), rel=1e-5)
    # a fixed margin replaces its percentile, and only its own
    fixed = energy_margins(head, ind, ood, K, Stage2Config(m_in=-7.5))
    assert fixed == {"m_in": -7.5, "m_out": margins["m_out"]}


def sgd_step(head: Head, ind, labels, ood, cfg: Stage2Config, margins) -> Head:
    """A copy of `head` after one plain gradient step on the stage-2 loss (Adam's first step is a
    sign step; a gradient step shows the loss's own direction)."""
    head = copy.deepcopy(head)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    optimizer.zero_grad()
    step_loss(head, ind, labels, ood, K, cfg, margins).backward()
    optimizer.step()
    return head


def mean_score(score, head, feats) -> float:
    with torch.no_grad():
        return float(score(head(feats), K).mean())


def test_an_energy_step_raises_pseudo_ood_energy_and_lowers_ind_energy(toy):
    head, ind, labels, ood = toy
    cfg = Stage2Config(mode="CMG-energy")
    margins = energy_margins(head, ind, ood, K, cfg)
    with torch.no_grad():
        e_in, e_out = energy_score(head(ind), K), energy_score(head(ood), K)
    # each hinge alone: IND already below m_in (no IND hinge) with every pseudo-OOD image ...
    confident = e_in < margins["m_in"]
    stepped = sgd_step(head, ind[confident], labels[confident], ood, cfg, margins)
    assert mean_score(energy_score, stepped, ood) > float(e_out.mean()) + 1e-3
    # ... and every IND image with pseudo-OOD already above m_out (no OOD hinge)
    far = e_out > margins["m_out"]
    stepped = sgd_step(head, ind, labels, ood[far], cfg, margins)
    assert mean_score(energy_score, stepped, ind) < float(e_in.mean()) - 1e-3


def test_a_softmax_step_raises_the_pseudo_ood_probability_of_the_extra_class(toy):
    head, ind, labels, ood = toy
    before = mean_score(softmax_ood_score, head, ood)
    stepped = sgd_step(head, ind, labels, ood, Stage2Config(mode="CMG-softmax"), {})
    assert mean_score(softmax_ood_score, stepped, ood) > before + 0.1
    with torch.no_grad():  # of the K + 1 logits of pseudo-OOD images, the extra class's gains most
        gain = (stepped(ood) - head(ood)).mean(dim=0)
    assert int(gain.argmax()) == K and float(gain[K]) > 0
    with torch.no_grad():  # the IND classes still win on IND images
        assert float((stepped(ind)[:, :K].argmax(1) == labels).float().mean()) == 1.0


def test_the_softmax_ood_target_is_the_extra_class_k():
    target = ood_target(5, K, torch.device("cpu"))
    assert target.dtype == torch.long and target.tolist() == [K] * 5
    # the step's OOD term is exactly the cross-entropy against class K
    logits_out = torch.randn(4, K + 1, generator=torch.Generator().manual_seed(1))
    head = torch.nn.Identity()
    cfg = Stage2Config(mode="CMG-softmax")
    labels_in = torch.tensor([0, 1, 2, 3])
    loss = step_loss(head, logits_out, labels_in, logits_out, K, cfg, {})
    log_p = torch.log_softmax(logits_out.double(), dim=1)
    by_hand = -log_p[torch.arange(4), labels_in].mean() - log_p[:, K].mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)


def test_stage2_cross_entropy_is_smoothed_over_the_ind_classes_as_stage1_was():
    """The IND term of every stage-2 step, by hand: -(1 - e) log p_y - e/K sum_{c<K} log p_c over
    the K + 1 outputs (the OOD slot gets no smoothing), e = stage 1's label smoothing unless
    stage2.label_smoothing says otherwise."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0, 1.0, 3.0],
                           [0.0, 1.5, 0.0, 0.0, -2.0, 0.0, -1.0]])
    labels = torch.tensor([0, 1])
    log_p = torch.log_softmax(logits.double(), dim=1)
    nll = -log_p[torch.arange(2), labels]  # 3.5325 - 2 and 2.1955 - 1.5 nats
    assert nll.tolist() == pytest.approx([1.5325, 0.6955], abs=1e-4)
    empty = torch.empty(0, K + 1)
    head = torch.nn.Identity()
    for e in (0.0, 0.1, 0.3):
        cfg = Stage2Config(mode="CMG-softmax", label_smoothing=e)
        by_hand = ((1 - e) * nll - e * log_p[:, :K].mean(dim=1)).mean()
        # the head-only control: the IND term alone
        assert float(step_loss(head, logits, labels, empty, K, cfg, {})) == pytest.approx(
            float(by_hand), rel=1e-6)
        # CMG-softmax: plus the pseudo-OOD term against class K, which is never smoothed
        with_ood = step_loss(head, logits, labels, logits, K, cfg, {})
        assert float(with_ood) == pytest.approx(float(by_hand - log_p[:, K].mean()), rel=1e-6)
    # smoothing 0.1 moves this batch's loss by +0.1583: no test of the loss misses it
    smoothed = step_loss(head, logits, labels, empty, K, Stage2Config(label_smoothing=0.1), {})
    plain = step_loss(head, logits, labels, empty, K, Stage2Config(label_smoothing=0.0), {})
    assert float(smoothed - plain) == pytest.approx(0.1583, abs=1e-4)


def test_stage2_label_smoothing_defaults_to_stage1s_and_a_knob_overrides_it():
    quick = budget_config("quick")
    assert quick.classifier.label_smoothing == quick.stage2.label_smoothing == 0.1
    assert budget_config("smoke").stage2.label_smoothing == 0.0  # stage 1 smooths nothing there
    assert budget_config("quick", overrides=["stage2.label_smoothing=0"]
                         ).stage2.label_smoothing == 0
    assert budget_config("quick", overrides=["classifier.label_smoothing=0.2"]
                         ).stage2.label_smoothing == 0.2
    # a record from before the knob (no key) trained stage 2 without smoothing, and says so
    old = quick.to_dict()
    del old["stage2"]["label_smoothing"]
    assert RunConfig.from_dict(old).stage2.label_smoothing == 0.0
    assert RunConfig.from_dict(quick.to_dict()) == quick
    # unresolved, stage 2 refuses to guess
    with pytest.raises(ValueError, match="label_smoothing is None"):
        run_stage2(None, None, None, Stage2Config(sigma=1.0))


class LatentRecordingCVAE(CVAE):
    """A real (untrained) MNIST CVAE that keeps the last z it decoded."""

    def decode(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        self.last_z = z.clone()
        return super().decode(z, embedding)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 5.0])
def test_sigma_is_the_std_of_the_latent_codes_decoded(sigma):
    torch.manual_seed(0)
    cvae = LatentRecordingCVAE(MnistEncoder(), MnistDecoder(), K, CVAEConfig(latent_dim=32)).eval()
    generate_pseudo_ood(cvae, 256, Stage2Config(), sigma, torch.Generator().manual_seed(3))
    z = cvae.last_z
    assert z.shape == (256, 32)
    assert float(z.std()) == pytest.approx(sigma, rel=0.03)  # 8192 draws: std error ~0.8%
    assert abs(float(z.mean())) < 0.05 * sigma
    # the same draws, scaled: sigma multiplies the N(0, I) codes and nothing else
    generate_pseudo_ood(cvae, 256, Stage2Config(), 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(z, cvae.last_z * sigma)


class EmbeddingRecordingCVAE(LatentRecordingCVAE):
    """... and the last condition (class embedding) it decoded from."""

    def decode(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        self.last_embedding = embedding.clone()
        return super().decode(z, embedding)


def test_the_unmixed_arm_decodes_from_one_class_embedding_per_sample():
    torch.manual_seed(0)
    cvae = EmbeddingRecordingCVAE(MnistEncoder(), MnistDecoder(), K, CVAEConfig()).eval()
    classes = cvae.class_embeddings().detach()
    for arm, mixed in (("single", False), ("mixed", True)):
        generate_pseudo_ood(cvae, 64, Stage2Config(pseudo_ood=arm), 3.0,
                            torch.Generator().manual_seed(5))
        # each condition equals one class's embedding exactly, or (CMG) none of them
        is_one_class = (cvae.last_embedding[:, None, :] == classes[None]).all(dim=2).any(dim=1)
        assert bool(is_one_class.all()) is not mixed and bool(is_one_class.any()) is not mixed


def test_the_noise_arm_is_uniform_images_that_no_cvae_decodes():
    cvae = EmbeddingRecordingCVAE(MnistEncoder(), MnistDecoder(), K, CVAEConfig()).eval()
    images = generate_pseudo_ood(cvae, 2000, Stage2Config(pseudo_ood="noise"), 3.0,
                                 torch.Generator().manual_seed(5))
    assert images.shape == (2000, 1, 28, 28) and not hasattr(cvae, "last_z")
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert float(images.mean()) == pytest.approx(0.5, abs=0.01)  # U(0, 1): mean 1/2, var 1/12
    assert float(images.var()) == pytest.approx(1 / 12, rel=0.02)


def test_the_head_only_arm_trains_on_ind_cross_entropy_alone(toy):
    head, ind, labels, ood = toy
    none = torch.empty(0, ind.shape[1])
    for mode in ("CMG-energy", "CMG-softmax"):
        cfg = Stage2Config(mode=mode, pseudo_ood="none")
        loss = step_loss(head, ind, labels, none, K, cfg, {})
        with torch.no_grad():  # nothing added to it (the loss is small: float32 on both sides)
            by_hand = F.cross_entropy(head(ind), labels)
        assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-6)
        # and its step is plain cross-entropy's: the same as a step on an IND-only loss
        stepped = sgd_step(head, ind, labels, none, cfg, {})
        plain = copy.deepcopy(head)
        optimizer = torch.optim.SGD(plain.parameters(), lr=0.01)
        F.cross_entropy(plain(ind), labels).backward()
        optimizer.step()
        for a, b in zip(stepped.parameters(), plain.parameters()):
            assert torch.allclose(a, b)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table():
    """A lease table on a hand-moved clock, with a live-node set the test edits."""
    clock, alive = Clock(), {"node-a", "node-b"}
    return LeaseTable(clock=clock, alive_nodes=lambda: set(alive)), clock, alive


def test_a_live_holder_keeps_its_lease_until_it_expires(table):
    leases, clock, _ = table
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED
    assert leases.acquire("k", "sweep/t2", "node-b") == HELD
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED  # the holder itself, again
    clock.now += LEASE_SECONDS - 1  # not renewed, not yet expired, its node alive
    assert leases.acquire("k", "sweep/t2", "node-b") == HELD
    assert leases.renew("k", "sweep/t1", "node-a")
    clock.now += LEASE_SECONDS - 1  # renewed meanwhile: still its
    assert leases.acquire("k", "sweep/t2", "node-b") == HELD
    assert leases.acquire("other-key", "sweep/t2", "node-b") == GRANTED  # one lease per key


def test_an_expired_lease_is_taken_over_while_the_holders_node_lives(table):
    leases, clock, alive = table
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED
    clock.now += LEASE_SECONDS + 0.5
    assert "node-a" in alive
    assert leases.acquire("k", "sweep/t2", "node-b") == GRANTED
    assert not leases.renew("k", "sweep/t1", "node-a")  # the old holder learns it lost it
    assert leases.acquire("k", "sweep/t1", "node-a") == HELD


def test_a_lease_is_taken_over_at_once_when_the_holders_node_dies(table):
    leases, clock, alive = table
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED
    clock.now += 1.0  # long before expiry
    assert leases.acquire("k", "sweep/t2", "node-b") == HELD
    alive.discard("node-a")
    assert leases.acquire("k", "sweep/t2", "node-b") == GRANTED


def test_a_published_key_is_never_granted_again(table):
    leases, clock, alive = table
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED
    leases.publish("k")
    clock.now += 10 * LEASE_SECONDS
    alive.clear()
    assert [leases.acquire("k", owner, "node-b") for owner in ("sweep/t1", "sweep/t2")] == [
        PUBLISHED, PUBLISHED]
    assert not leases.renew("k", "sweep/t1", "node-a")


def test_release_frees_only_the_holders_own_lease(table):
    leases, _, _ = table
    assert leases.acquire("k", "sweep/t1", "node-a") == GRANTED
    leases.release("k", "sweep/t2")  # not its lease: nothing happens
    assert leases.acquire("k", "sweep/t2", "node-b") == HELD
    leases.release("k", "sweep/t1")
    assert leases.acquire("k", "sweep/t2", "node-b") == GRANTED
