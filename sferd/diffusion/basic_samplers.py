"""The first-order samplers of the family (`sferd.diffusion.samplers`) and what every sampler shares: the time grid,
the clipped prediction, the call signature.

Kept apart from the registry on purpose: a stage that samples with DDIM alone (every FID stage of PD, SFERD and
the teacher) imports this module and not the registry, whose built-in entries pull in gDDIM, D-ODE and CLD. Code
deps follow imports (sferd/pipeline/codedeps.py), so an edit of those samplers does not re-run those stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from sferd.diffusion.denoiser import Denoiser
from sferd.diffusion.parameterization import clip_x0
from sferd.diffusion.sampler import ddim_step
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr
from sferd.diffusion.schedule_calculus import dlogsnr_dt

Callback = Callable[[int, float, torch.Tensor], None]


class Sampler(Protocol):
    def __call__(self, denoise: Any, noise: torch.Tensor, grid_or_steps: int | Sequence[float] | torch.Tensor, *,
                 y: torch.Tensor | None = None, callback: Callback | None = None) -> torch.Tensor: ...


def time_grid(grid_or_steps: int | Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    """The grid as a tuple of Python floats, t_0 > t_1 > … (first = start time, last = end time).

    An int N gives (N/N, (N−1)/N, …, 0) computed as i/N, so each value is the correctly rounded float of the same
    rational as `ddim_sample`'s `i / steps` (and the sampler's results match it bit for bit).
    """
    if isinstance(grid_or_steps, bool):
        raise TypeError("grid_or_steps must be an int or a sequence of times, got a bool")
    if isinstance(grid_or_steps, int):
        if grid_or_steps < 1:
            raise ValueError(f"steps must be >= 1, got {grid_or_steps}")
        return tuple(i / grid_or_steps for i in range(grid_or_steps, -1, -1))
    if isinstance(grid_or_steps, torch.Tensor):
        grid = tuple(float(v) for v in grid_or_steps.detach().double().reshape(-1).tolist())
    else:
        grid = tuple(float(v) for v in grid_or_steps)
    if len(grid) < 2:
        raise ValueError(f"a time grid needs at least 2 times (one step), got {len(grid)}")
    if any(not math.isfinite(v) or v < 0.0 or v > 1.0 for v in grid):
        raise ValueError(f"grid times must lie in [0, 1], got {grid}")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the time grid must be strictly decreasing, got {grid}")
    return grid


def _tfull(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), value, dtype=like.dtype, device=like.device)


def predict(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, clip: bool):
    """(x̂₀, ε̂) at (x, t), x̂₀ clipped to [−1, 1] and ε̂ re-derived when `clip` (PD's eval_clip_denoised), exactly
    as `ddim_sample` does it."""
    x0, eps = denoise(x, t, y)
    if clip:
        alpha, sigma = alpha_sigma(logsnr(t))
        x0, eps = clip_x0(x0, x, broadcast(alpha, x), broadcast(sigma, x))
    return x0, eps


class DDIM:
    """Deterministic DDIM (η = 0): x_s = α_s x̂₀ + (σ_s/σ_t)(x_t − α_t x̂₀), the last step to t = 0 returning x̂₀.

    A re-expression of `ddim_sample` on any grid (same predictions, same `ddim_step`, same float operations), with a
    callback; tests/test_samplers.py checks it equals `ddim_sample` bit for bit on integer grids.
    """

    name = "ddim"

    def __init__(self, *, clip: bool = True):
        self.clip = clip

    @torch.no_grad()
    def __call__(self, denoise, noise, grid_or_steps, *, y=None, callback=None):
        grid = time_grid(grid_or_steps)
        x = noise
        for i, (tv, sv) in enumerate(zip(grid, grid[1:])):
            t = _tfull(tv, noise)
            x0, _ = predict(denoise, x, t, y, self.clip)
            x = x0 if sv == 0.0 else ddim_step(x, x0, t, _tfull(sv, noise))
            if callback is not None:
                callback(i, sv, x)
        return x


def pf_velocity_coefficient(t: torch.Tensor) -> torch.Tensor:
    """c(t) = ½ λ'(t) α_t σ_t (float64), so that the VP probability-flow ODE reads dx/dt = c(t)(σ_t x̂₀ − α_t ε̂).

    Derivation: x = α x̂₀ + σ ε̂ along the flow with x̂₀, ε̂ the posterior means; dx/dt = (α'/α) x + α (σ/α)' ε̂
    with α'/α = ½ σ² λ' and (σ/α)' = −½ λ' σ/α; substituting x gives ½ λ' α σ (σ x̂₀ − α ε̂). Written this way no
    large λ' (≈ −7·10⁴ at t = 1) meets an image: c is O(1) (exactly −a on the cosine schedule).
    """
    lam = logsnr(t.double())
    alpha, sigma = alpha_sigma(lam)
    return 0.5 * dlogsnr_dt(t.double()) * alpha * sigma


class EulerPF:
    """Plain explicit Euler in t on the probability-flow ODE dx/dt = c(t)(σ_t x̂₀ − α_t ε̂) (`pf_velocity_coefficient`).

    The first-order baseline an exponential integrator is compared with (gDDIM's Euler rows). On the last step to
    t = 0 it lands on x at t = 0 (σ₀ ≈ 4.5e-5), which is returned: the Euler update has no separate data estimate.
    """

    name = "euler_pf"

    def __init__(self, *, clip: bool = True):
        self.clip = clip

    @torch.no_grad()
    def __call__(self, denoise, noise, grid_or_steps, *, y=None, callback=None):
        grid = time_grid(grid_or_steps)
        x = noise
        for i, (tv, sv) in enumerate(zip(grid, grid[1:])):
            t = _tfull(tv, noise)
            x0, eps = predict(denoise, x, t, y, self.clip)
            t64 = t.double()
            alpha, sigma = alpha_sigma(logsnr(t64))
            h = (sv - tv) * pf_velocity_coefficient(t64)  # float64 coefficients, cast once by `broadcast`
            x = x + broadcast(h * sigma, x) * x0 - broadcast(h * alpha, x) * eps
            if callback is not None:
                callback(i, sv, x)
        return x
