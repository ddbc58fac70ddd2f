"""The reference's conditional VAEs (layer for layer, with its defects 4 and 6 fixed: see
docs/design.md). The encoder does not see the label; the decoder is conditioned on a class
embedding (a Linear map of a one-hot over the K IND classes), so stage 2 can decode from *mixed*
embeddings. MNIST: 2 strided convs in, 2 transposed convs out (13.2M parameters: 13,249,185 at
K = 6); CIFAR: a ResNet-18 encoder, a decoder of 2 residual blocks and 3 transposed convs (33.9M).

    cvae = build_cvae("mnist", num_classes=6)
    recon, mu, logvar = cvae(x, y)
    images = cvae.decode(z, cvae.class_embeddings()[y])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cmg.config import CVAEConfig
from cmg.models.classifier import CifarResNet18


class MnistEncoder(nn.Module):
    """The reference's: two strided 4x4 convs, 1 -> 64 -> 128 channels, ReLU, 28 -> 14 -> 7
    (padding 1: the reference's padding 15, defect 4, kept 28x28 and made its first Linear layer
    103M parameters)."""

    out_dim = 128 * 7 * 7

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class MnistDecoder(nn.Module):
    """The reference's: 128x7x7 -> two strided 4x4 transposed convs, 128 -> 64 -> 1, 7 -> 14 -> 28."""

    in_dim = 128 * 7 * 7
    image_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(64, 1, 4, 2, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.reshape(-1, 128, 7, 7))


class ResBlock(nn.Module):
    """The reference decoder's residual block: relu(x) + BN(conv1x1(relu(BN(conv3x3(relu(x)))))).
    The reference writes relu(x) + ... as x + ..., with an in-place ReLU first in the block that
    overwrites x before the sum; this is what it computes."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim), nn.ReLU(),
                                   nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return x + self.block(x)


class CifarDecoder(nn.Module):
    """The reference's: 512x4x4 -> 2 residual blocks -> 3 transposed 4x4 convs at 512 channels
    (4 -> 8 -> 16 -> 32), BN and ReLU between them, 3 channels out."""

    in_dim = 512 * 4 * 4
    image_shape = (3, 32, 32)

    def __init__(self, dim: int = 512):
        super().__init__()
        def up(cin, cout):
            return [nn.ReLU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
        self.net = nn.Sequential(ResBlock(dim), ResBlock(dim), *up(dim, dim), nn.BatchNorm2d(dim),
                                 *up(dim, dim), nn.BatchNorm2d(dim), *up(dim, 3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.reshape(-1, 512, 4, 4))


class CVAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int,
                 cfg: CVAEConfig = CVAEConfig()):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, cfg.latent_dim
        self.image_shape = decoder.image_shape  # (channels, height, width) it decodes
        self.encoder = encoder
        self.enc_fc = nn.Sequential(nn.Linear(encoder.out_dim, cfg.hidden), nn.ReLU())
        self.mu = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.hidden, cfg.latent_dim)
        embed_dim = cfg.embed_dim or cfg.latent_dim  # the reference's: the latent size
        self.class_embed = nn.Linear(num_classes, embed_dim)
        self.dec_fc = nn.Sequential(nn.Linear(cfg.latent_dim + embed_dim, cfg.hidden),
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
