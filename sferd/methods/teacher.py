"""Teacher training: continuous-time VP diffusion (sferd-method.md §4; PD §4 and Table 1).

t ~ U[0, 1], x_t = α_t x₀ + σ_t ε, loss = w(λ_t)·mean‖x̂₀ − x₀‖² with w = max(SNR, 1) (truncated SNR) by
default. Adam with linear warm-up, decoupled weight decay, global-norm gradient clipping and an EMA whose
weights are what gets distilled.
"""

from __future__ import annotations

import torch

from sferd.diffusion.denoiser import NetworkDenoiser
from sferd.diffusion.losses import weighted_x_mse
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr
from sferd.methods.draws import Draws


def teacher_loss(
    denoiser: NetworkDenoiser,
    x0: torch.Tensor,
    draws: Draws,
    *,
    weighting: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss (B,); t and ε from each sample's draws."""
    t = draws.rand()
    eps = draws.randn(*x0.shape[1:])
    lam = logsnr(t)
    alpha, sigma = alpha_sigma(lam)
    x_t = broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps
    x0_pred, _ = denoiser(x_t, t, y)
    return weighted_x_mse(x0_pred, x0, lam, weighting)
