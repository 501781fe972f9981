"""The latent prior's denoiser: DiffAE/PDAE's "MLP with skip" over semantic codes (sferd-method.md §8, D6, D13).

SFERD samples its semantic code z from a small diffusion model over the normalised codes z_n; this module is that
model's ε-network. Structure (DiffAE's ``MLPSkipNet`` as used by PDAE):

    cond = Linear → SiLU → Linear (sinusoid(t))            (+ class embedding on conditional data, D6)
    h    = z_t
    for l in 0 … L−2  (hidden layers):
        h = [h, z_t]           (l > 0 only: the input is re-injected into every later layer)
        h = Linear_l(h) · (1 + P_l(cond))
        h = dropout(SiLU(LayerNorm(h)))
    ε̂   = Linear_out([h, z_t])                                  (no norm, no activation)

Wiring choices where the brief leaves room (change them only together with tests/test_latent_prior.py):

* ``num_layers`` counts every Linear of the main stack, the output layer included (DiffAE's count), so the paper
  scale "10 layers" is 9 modulated hidden layers + 1 output layer; at least 2 are required.
* The output layer receives the skip as well ([h, z_t], width + latent_dim inputs), as in DiffAE where every layer
  after the first is a skip layer. Re-injecting z_t keeps a deep, LayerNorm'd stack from losing the input's scale,
  which ε-prediction needs (ε̂ ≈ z_t at large t).
* The per-layer projection is P_l = SiLU → Linear(width → width). The SiLU in front is PDAE's (its ``cond_layers``
  are activation + Linear); it keeps P_l from being a plain linear re-mix of the last time-MLP Linear, so each layer
  gets its own nonlinear view of t. The scale is multiplicative only (no shift), as in DiffAE's default.
* The time embedding is a sinusoid of the *discrete* step index t ∈ {0, …, T−1} (DDPM/PDAE convention), not of
  the continuous u used by the image U-Net, because the prior has its own 1000-step discrete schedule.
* On conditional data the class embedding (nn.Embedding(num_classes, width)) is added to the time-MLP *output*, so
  every layer's modulation depends on (t, y) jointly (project choice D6).
* Initialisation follows PDAE: Kaiming-normal (ReLU gain) weights for the modulated hidden layers and their
  projections, because the stack is SiLU-activated; the output layer and time MLP keep PyTorch's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentMLPConfig:
    """Sizes of the latent denoiser. Defaults are paper scale (D13: latent 512, width 2048, 10 layers)."""

    latent_dim: int = 512
    width: int = 2048
    num_layers: int = 10
    time_emb_dim: int = 64  # DiffAE/PDAE's num_time_emb_channels
    num_classes: int | None = None  # set on conditional datasets (D6); None → unconditional
    dropout: float = 0.0  # sferd-method.md §8: dropout 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"LatentMLPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_emb_dim < 2:
            raise ValueError(f"LatentMLPConfig.time_emb_dim must be >= 2 (one sin/cos pair), got {self.time_emb_dim}")
        if self.num_layers < 2:
            raise ValueError(f"LatentMLPConfig.num_layers counts the output layer too and must be >= 2, "
                             f"got {self.num_layers}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"LatentMLPConfig.num_classes must be None or >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LatentMLPConfig.dropout must be in [0, 1), got {self.dropout}")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) step indices → (B, dim) [cos | sin] features with frequencies 1 … 1/max_period (DDPM style)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:  # odd widths: pad, so the configured width is honoured exactly
        emb = F.pad(emb, (0, 1))
    return emb


class ModulatedLayer(nn.Module):
    """One hidden layer: Linear → ×(1 + P(cond)) → LayerNorm → SiLU → dropout."""

    def __init__(self, in_features: int, width: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_features, width)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.linear, self.cond_proj[1]):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # Scale before the norm (DiffAE order): the norm then fixes the overall scale, so the modulation only
        # reweights features relative to each other and cannot blow activations up at any t.
        h = self.linear(h) * (1.0 + self.cond_proj(cond))
        return self.dropout(F.silu(self.norm(h)))


class LatentMLP(nn.Module):
    """ε-prediction network of the latent prior: ``forward(z_t, t, y=None) -> ε̂`` with z_t (B, latent_dim)."""

    def __init__(self, config: LatentMLPConfig):
        super().__init__()
        self.config = config
        c = config
        self.time_mlp = nn.Sequential(nn.Linear(c.time_emb_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.class_emb = nn.Embedding(c.num_classes, c.width) if c.num_classes is not None else None
        # Layer 0 sees z_t alone; every later layer sees [h, z_t] (the skip), hence width + latent_dim inputs.
        self.layers = nn.ModuleList(
            ModulatedLayer(c.latent_dim if i == 0 else c.width + c.latent_dim, c.width, c.dropout)
            for i in range(c.num_layers - 1)
        )
        self.out = nn.Linear(c.width + c.latent_dim, c.latent_dim)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if z_t.ndim != 2 or z_t.shape[1] != c.latent_dim:
            raise ValueError(f"z_t must have shape (B, {c.latent_dim}), got {tuple(z_t.shape)}")
        if t.shape != (z_t.shape[0],):
            raise ValueError(f"t must have shape ({z_t.shape[0]},), got {tuple(t.shape)}")
        # A silently ignored label (or a silently missing one) would train/sample the wrong prior, so both are errors.
        if self.class_emb is not None and y is None:
            raise ValueError(f"this latent prior is class-conditional ({c.num_classes} classes): y is required")
        if self.class_emb is None and y is not None:
            raise ValueError("this latent prior is unconditional: y must be None")

        cond = self.time_mlp(sinusoidal_embedding(t, c.time_emb_dim))
        if self.class_emb is not None:
            cond = cond + self.class_emb(y)
        h = z_t
        for i, layer in enumerate(self.layers):
            h = layer(h if i == 0 else torch.cat([h, z_t], dim=1), cond)
        return self.out(torch.cat([h, z_t], dim=1))
