"""Independent references for the sampler tests: the cosine schedule, Gaussian data's exact denoiser and exact
probability-flow end, written from the formulas and not from sferd.diffusion.

Gaussian data x₀ ~ N(m, s²) per pixel: x_t = α x₀ + σ ε ~ N(α m, α² s² + σ²), so E[ε | x_t] = σ (x_t − α m)/(α² s²
+ σ²) and E[x₀ | x_t] = m + α s² (x_t − α m)/(α² s² + σ²). The probability flow keeps the standardised residual
(x_t − α_t m)/√(α_t² s² + σ_t²) constant, so from x at t = 1 the exact data end (σ = 0, α = 1) is
m + s (x_1 − α_1 m)/√(α_1² s² + σ_1²).
"""

from __future__ import annotations

import math

import torch

M, S = 0.3, 0.5
# the schedule written independently of sferd.diffusion.schedule (sferd-method.md §1)
_B = math.atan(math.exp(-10.0))
_A = math.atan(math.exp(10.0)) - _B


def ab(t):
    """(α, σ) of the cosine schedule: α = cos(a t + b), σ = sin(a t + b) (tan = σ/α = e^{−λ/2})."""
    th = _A * torch.as_tensor(t, dtype=torch.float64) + _B
    return torch.cos(th), torch.sin(th)


def gaussian_denoiser(x, t, y=None):
    a, s = ab(t.double())
    a, s = a.reshape(-1, *([1] * (x.ndim - 1))), s.reshape(-1, *([1] * (x.ndim - 1)))
    xd = x.double()
    var = a**2 * S**2 + s**2
    eps = s * (xd - a * M) / var
    x0 = M + a * S**2 * (xd - a * M) / var
    return x0.to(x.dtype), eps.to(x.dtype)


def exact_end(x1):
    a, s = ab(1.0)
    return M + S * (x1.double() - a * M) / torch.sqrt(a**2 * S**2 + s**2)


def noise64(n=256, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class TinyNet(torch.nn.Module):
    """A fixed random network (x, t) → (x̂₀, ε̂): not a Gaussian, so the DDIM comparison exercises clipping too."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.8)

    def forward(self, x, t, y=None):
        flat = x.reshape(x.shape[0], -1)
        x0 = torch.tanh(flat @ self.w * (1 + t[:, None])) * 1.5
        x0 = x0.reshape(x.shape)
        a, s = ab(t)
        a = a.to(x.dtype).reshape(-1, 1, 1, 1)
        s = s.to(x.dtype).reshape(-1, 1, 1, 1)
        return x0, (x - a * x0) / s
