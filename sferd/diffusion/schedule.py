"""Continuous-time variance-preserving noise schedule (sferd-method.md §1).

Cosine logSNR schedule of PD (Salimans & Ho, ICLR 2022), clipped to [λ_min, λ_max] = [-20, 20]:
λ(t) = -2 log tan(a t + b), with b = arctan(e^{-λ_max/2}) and a = arctan(e^{-λ_min/2}) - b, so λ(0) = 20
and λ(1) = -20. Everything downstream works from λ, because α and σ are computed as sqrt(sigmoid(±λ)),
which stays accurate where 1 - α² would cancel.
"""

from __future__ import annotations

import math

import torch

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0

_B = math.atan(math.exp(-0.5 * LOGSNR_MAX))
_A = math.atan(math.exp(-0.5 * LOGSNR_MIN)) - _B


def logsnr(t: torch.Tensor) -> torch.Tensor:
    """λ(t) of the clipped cosine schedule; t in [0, 1], any shape."""
    t = torch.as_tensor(t, dtype=torch.float32)
    # float64 inside: tan near π/2 loses digits in float32 at t = 1.
    return (-2.0 * torch.log(torch.tan(_A * t.double() + _B))).to(t.dtype)


def alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) from λ: α² = sigmoid(λ), σ² = sigmoid(-λ)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def time_input(lam: torch.Tensor) -> torch.Tensor:
    """Network time input u = arctan(e^{-λ/2}) / (π/2) in [0, 1] (PD's convention)."""
    return torch.atan(torch.exp(-0.5 * lam)) / (0.5 * math.pi)


def sigma_ratio(lam_s: torch.Tensor, lam_t: torch.Tensor) -> torch.Tensor:
    """σ_s / σ_t computed from logSNRs without subtracting nearly equal numbers.

    σ² = sigmoid(-λ) = 1 / (1 + e^{λ}) so log σ = -½ softplus(λ).
    """
    return torch.exp(0.5 * (torch.nn.functional.softplus(lam_t) - torch.nn.functional.softplus(lam_s)))


def snr(lam: torch.Tensor) -> torch.Tensor:
    return torch.exp(lam)


def broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor so it broadcasts against a B×C×H×W tensor."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
