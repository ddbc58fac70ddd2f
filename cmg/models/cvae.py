"""Conditional VAEs. The encoder does not see the label; the decoder is conditioned on a class
embedding (a Linear map of a one-hot over the K IND classes, the reference's defect 6 fixed), so
stage 2 can decode from *mixed* embeddings.

    cvae = build_cvae("mnist", num_classes=6)
    recon, mu, logvar = cvae(x, y)
    images = cvae.decode(z, cvae.class_embeddings()[y])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cmg.config import CVAEConfig
from cmg.models.classifier import BasicBlock, CifarResNet18


class MnistEncoder(nn.Module):
    """Two strided convs 28 -> 14 -> 7 (padding 1: the reference's padding 15, defect 4, kept
    28x28 and made one Linear layer 103M parameters)."""

    out_dim = 64 * 7 * 7

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class MnistDecoder(nn.Module):
    in_dim = 64 * 7 * 7

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.ConvTranspose2d(32, 1, 4, 2, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.reshape(-1, 64, 7, 7))


class CifarDecoder(nn.Module):
    """512x4x4 -> 2 residual blocks -> 3 transposed convs (4 -> 8 -> 16 -> 32)."""

    in_dim = 512 * 4 * 4

    def __init__(self):
        super().__init__()
        def up(cin, cout):
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU()]
        self.net = nn.Sequential(BasicBlock(512, 512), BasicBlock(512, 512), *up(512, 256),
                                 *up(256, 128), nn.ConvTranspose2d(128, 3, 4, 2, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.reshape(-1, 512, 4, 4))


class CVAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int,
                 cfg: CVAEConfig = CVAEConfig()):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, cfg.latent_dim
        self.encoder = encoder
        self.enc_fc = nn.Sequential(nn.Linear(encoder.out_dim, cfg.hidden), nn.ReLU())
        self.mu = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.class_embed = nn.Linear(num_classes, cfg.embed_dim)
        self.dec_fc = nn.Sequential(nn.Linear(cfg.latent_dim + cfg.embed_dim, cfg.hidden),
                                    nn.ReLU(), nn.Linear(cfg.hidden, decoder.in_dim))
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc_fc(self.encoder(x))
        return self.mu(h), self.logvar(h)

    def class_embeddings(self) -> torch.Tensor:
        """(K, embed_dim): the embedding of each class's one-hot."""
        return self.class_embed.weight.T + self.class_embed.bias

    def decode(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.dec_fc(torch.cat([z, embedding], dim=1))))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, self.class_embed(F.one_hot(y, self.num_classes).to(z.dtype))), mu, logvar


def cvae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              kl_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel MSE + kl_weight * KL (mean over the batch, divided by pixels per image)."""
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean() / x[0].numel()
    return F.mse_loss(recon.float(), x.float()) + kl_weight * kl


def build_cvae(family: str, num_classes: int, cfg: CVAEConfig = CVAEConfig()) -> CVAE:
    if family == "mnist":
        return CVAE(MnistEncoder(), MnistDecoder(), num_classes, cfg)
    if family == "cifar":
        return CVAE(CifarResNet18(), CifarDecoder(), num_classes, cfg)
    raise ValueError(f"unknown model family {family!r}")
