"""The one interface every method's teacher/student exposes: (x_t, t, y) → (x̂₀, ε̂), unclipped.

Samplers, the PD target and (later) the attention-guided teacher all speak this interface, so a guided
teacher is a drop-in replacement for a plain one (sferd-method.md §5 step 8).
"""

from __future__ import annotations

from typing import Protocol

import torch

from sferd.diffusion.parameterization import to_x0_eps
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, time_input


class Denoiser(Protocol):
    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class NetworkDenoiser:
    """Wraps a network f(x, u, y) that outputs the `parameterization`'s quantity."""

    def __init__(self, net: torch.nn.Module, parameterization: str):
        self.net = net
        self.parameterization = parameterization

    def __call__(self, x_t, t, y=None):
        lam = logsnr(t)
        alpha, sigma = alpha_sigma(lam)
        out = self.net(x_t, time_input(lam), y)
        return to_x0_eps(self.parameterization, out, x_t, broadcast(alpha, x_t), broadcast(sigma, x_t))
