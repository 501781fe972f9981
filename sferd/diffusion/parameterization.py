"""Network output → (x̂₀, ε̂) for the four parameterizations (sferd-method.md §2; PD §4).

Every conversion keeps the identity x_t = α_t x̂₀ + σ_t ε̂ *before* clipping; property tests rely on it.
Clipping happens only at sampling time; training losses never clip (clipping zeroes the gradient of
out-of-range pixels, a bug of the released SFERD code).
"""

from __future__ import annotations

from typing import Literal

import torch

Parameterization = Literal["x", "eps", "v", "both"]
PARAMETERIZATIONS: tuple[str, ...] = ("x", "eps", "v", "both")


def output_channels(kind: str, channels: int) -> int:
    """`both` predicts x and ε separately, so the network needs 2C outputs."""
    return 2 * channels if kind == "both" else channels


def to_x0_eps(
    kind: str, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert the raw output; `alpha`/`sigma` must already broadcast against x_t."""
    if kind == "x":
        x0 = out
        eps = (x_t - alpha * x0) / sigma
    elif kind == "eps":
        eps = out
        x0 = (x_t - sigma * eps) / alpha
    elif kind == "v":
        x0 = alpha * x_t - sigma * out
        eps = sigma * x_t + alpha * out
    elif kind == "both":
        # PD's mixture: weight the direct x-prediction by σ² (good at high noise) and the ε-derived one
        # by α² (good at low noise); written as σ² o_x + α (x_t − σ o_ε).
        o_x, o_eps = out.chunk(2, dim=1)
        x0 = sigma**2 * o_x + alpha * (x_t - sigma * o_eps)
        eps = (x_t - alpha * x0) / sigma
    else:
        raise ValueError(f"unknown parameterization {kind!r}; expected one of {PARAMETERIZATIONS}")
    return x0, eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * eps - sigma * x0


def clip_x0(
    x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip x̂₀ to [-1, 1] and re-derive ε̂ so the pair stays consistent with x_t."""
    x0 = x0.clamp(-1.0, 1.0)
    return x0, (x_t - alpha * x0) / sigma
