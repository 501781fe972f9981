"""Continuous-time variance-preserving noise schedule (sferd-method.md §1).

Cosine logSNR schedule of PD (Salimans & Ho, ICLR 2022), clipped to [λ_min, λ_max] = [-20, 20]:
λ(t) = -2 log tan(a t + b), with b = arctan(e^{-λ_max/2}) and a = arctan(e^{-λ_min/2}) - b, so λ(0) = 20
and λ(1) = -20. Everything downstream works from λ, because α and σ are computed as sqrt(sigmoid(±λ)),
which stays accurate where 1 - α² would cancel.

Precision: every function computes in float64 and casts once at the end, to its input's floating dtype (float32
for integer or Python inputs), and `broadcast` casts a coefficient to the image's dtype where the two meet. So a
float64 t (the PD target builds one, `sferd.methods.pd`) keeps float64 coefficients all the way to the image
arithmetic: at N = 4096 the target divides by α_{t−1/N} − r·α_t ≈ O(1/N), which turns float32 rounding of the
coefficients (~6e-8 relative) into errors of up to ~7.5e-4 in x̃ (issue 11 §4).
"""

from __future__ import annotations

import math

import torch

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0

_B = math.atan(math.exp(-0.5 * LOGSNR_MAX))
_A = math.atan(math.exp(-0.5 * LOGSNR_MIN)) - _B


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a schedule function returns for input `x`: its own if floating (float64 in, float64 out), else
    float32 (integer step indices, Python numbers)."""
    return x.dtype if x.is_floating_point() else torch.float32


def logsnr(t: torch.Tensor) -> torch.Tensor:
    """λ(t) of the clipped cosine schedule; t in [0, 1], any shape. Computed in float64, returned in t's dtype."""
    t = torch.as_tensor(t)
    # float64 inside: tan near π/2 loses digits in float32 at t = 1.
    return (-2.0 * torch.log(torch.tan(_A * t.double() + _B))).to(_out_dtype(t))


def alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) from λ: α² = sigmoid(λ), σ² = sigmoid(-λ). Computed in float64, returned in λ's dtype."""
    lam = torch.as_tensor(lam)
    lam64, dtype = lam.double(), _out_dtype(lam)
    return torch.sigmoid(lam64).sqrt().to(dtype), torch.sigmoid(-lam64).sqrt().to(dtype)


def time_input(lam: torch.Tensor) -> torch.Tensor:
    """Network time input u = arctan(e^{-λ/2}) / (π/2) in [0, 1] (PD's convention)."""
    lam = torch.as_tensor(lam)
    return (torch.atan(torch.exp(-0.5 * lam.double())) / (0.5 * math.pi)).to(_out_dtype(lam))


def sigma_ratio(lam_s: torch.Tensor, lam_t: torch.Tensor) -> torch.Tensor:
    """σ_s / σ_t computed from logSNRs without subtracting nearly equal numbers.

    σ² = sigmoid(-λ) = 1 / (1 + e^{λ}) so log σ = -½ softplus(λ). Computed in float64, returned in the inputs'
    promoted dtype.
    """
    lam_s, lam_t = torch.as_tensor(lam_s), torch.as_tensor(lam_t)
    dtype = torch.promote_types(_out_dtype(lam_s), _out_dtype(lam_t))
    softplus = torch.nn.functional.softplus
    return torch.exp(0.5 * (softplus(lam_t.double()) - softplus(lam_s.double()))).to(dtype)


def snr(lam: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lam)
    return torch.exp(lam.double()).to(_out_dtype(lam))


def broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor so it broadcasts against a B×C×H×W tensor.

    This is where schedule coefficients meet images, so a floating coefficient is cast to the image's dtype here,
    once: callers may compute coefficients in float64 (the PD target at large N needs it) without turning the
    image arithmetic into float64. Masks and indices (bool, int) keep their dtype.
    """
    v = v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
    if v.is_floating_point() and like.is_floating_point() and v.dtype != like.dtype:
        v = v.to(like.dtype)
    return v
