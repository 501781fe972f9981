"""gDDIM for the VP process (Zhang, Tao & Chen, ICLR 2023): a multistep exponential integrator of the
probability-flow ODE in the ε-parameterisation.

The maths. With ρ = σ/α = e^{−λ/2} and y = x/α, the VP probability-flow ODE is dy/dρ = ε̂(x, t) (the ε of the
denoiser, which on VP is gDDIM's ε for K_t = R_t = σ_t). Between grid times t > s, exactly

    x_s = (α_s/α_t) x_t + α_s ∫_{ρ_t}^{ρ_s} ε̂(τ(ρ)) dρ.

Order q approximates ε̂ on [s, t] by the Lagrange polynomial in *time* through the last q+1 predictions
ε̂_0 = ε̂(t_k), ε̂_1 = ε̂(t_{k−1}), … (current first, then earlier, larger times), ℓ_j its basis polynomials, so

    x_s = (α_s/α_t) x_t + α_s Σ_j C_j ε̂_j,      C_j = ∫_{ρ_t}^{ρ_s} ℓ_j(τ(ρ)) dρ.

Because Σ_j ℓ_j ≡ 1, Σ_j C_j = ρ_s − ρ_t, and the step is written as the DDIM step with the current prediction plus
a correction in differences of ε̂'s:

    x_s = DDIM(x_t, x̂₀_0; t → s) + Σ_{j≥1} α_s C_j (ε̂_j − ε̂_0).

That is the numerically stable form (the literal (α_s/α_t) x_t term divides by α_1 ≈ 4.5e-5 and cancels in float32),
and it makes order 0 *the* DDIM step, so gDDIM order 0 equals `ddim_sample` to the last bit.

Decisions where the paper leaves room (the paper's VP experiments use DEIS' recipe; these are this project's):
* Quadrature: Gauss–Legendre in float64 with `NODES` nodes, in u = log ρ for interior steps (the e^u integrand is
  entire, while in ρ or t the first step's integrand is sharply peaked at t = 1), and in ρ itself for the last step
  to the data end (ρ → 0, where log ρ is unbounded).
* The data end: a grid ending at t = 0 integrates the last step to ρ = 0, α = 1 (σ = 0), as DDIM returns x̂₀.
* Warm-up: step k uses order min(q, k): there are only k earlier predictions. The first step is then a DDIM step
  with local error O(h²), which caps the observed global order at 2 for q ≥ 2 (tests/test_samplers.py measures
  rates ≈ 1, 2, 2, 2 for q = 0…3 on Gaussian data); the higher orders still cut the error at few steps.
* With `clip`, the clipped x̂₀ and its re-derived ε̂ enter both the DDIM part and the history.
* Coefficients are precomputed once per (grid, order) and cached (`coefficients`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from sferd.diffusion.sampler import ddim_step
from sferd.diffusion.basic_samplers import _tfull, predict, time_grid
from sferd.diffusion.samplers import register
from sferd.diffusion.schedule import alpha_sigma, logsnr
from sferd.diffusion.schedule_calculus import time_from_logsnr

NODES = 48  # Gauss–Legendre nodes per step; exact for polynomials of degree 95, far beyond what a step needs


def _rho(t: float) -> float:
    """ρ = σ/α = e^{−λ/2} at t (float64)."""
    return math.exp(-0.5 * float(logsnr(torch.tensor(t, dtype=torch.float64))))


def _time_of_rho(rho: np.ndarray) -> np.ndarray:
    """t(ρ) by the schedule's inverse, float64 (ρ = 0 maps to λ = +∞, i.e. slightly below t = 0)."""
    with np.errstate(divide="ignore"):
        lam = -2.0 * np.log(rho)
    return time_from_logsnr(torch.from_numpy(lam)).numpy()


def lagrange_basis(nodes: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """ℓ_j(τ) for every node j (rows) and evaluation point (columns): ℓ_j = Π_{m≠j} (τ − t_m)/(t_j − t_m)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    out = np.ones((len(nodes), len(tau)))
    for j, tj in enumerate(nodes):
        for m, tm in enumerate(nodes):
            if m != j:
                out[j] *= (tau - tm) / (tj - tm)
    return out


def integral_coefficients(nodes: tuple[float, ...], t: float, s: float, *, data_end: bool) -> np.ndarray:
    """C_j = ∫_{ρ_t}^{ρ_s} ℓ_j(τ(ρ)) dρ for the Lagrange basis on `nodes` (times), by Gauss–Legendre in float64.

    Interior steps substitute ρ = e^u (dρ = e^u du); the data-end step (`data_end`: ρ_s = 0) integrates in ρ.
    """
    x, w = np.polynomial.legendre.leggauss(NODES)
    rho_t = _rho(t)
    if data_end:
        a, b = rho_t, 0.0  # ∫_{ρ_t}^{0}
        rho = 0.5 * (b - a) * x + 0.5 * (a + b)
        weights = 0.5 * (b - a) * w
    else:
        a, b = math.log(rho_t), math.log(_rho(s))
        u = 0.5 * (b - a) * x + 0.5 * (a + b)
        rho = np.exp(u)
        weights = 0.5 * (b - a) * w * rho
    tau = _time_of_rho(rho)
    return lagrange_basis(np.asarray(nodes), tau) @ weights


@dataclass(frozen=True)
class StepCoefficients:
    t: float
    s: float
    data_end: bool  # the step integrates to ρ = 0 and returns the data estimate
    history: tuple[float, ...]  # α_s C_j for j = 1 … p (p = this step's order): weights of ε̂_j − ε̂_0


@dataclass(frozen=True)
class GDDIMCoefficients:
    """Everything gDDIM needs for one (grid, order): per step, the float64 weights of the ε̂ differences."""

    grid: tuple[float, ...]
    order: int
    steps: tuple[StepCoefficients, ...]


@functools.lru_cache(maxsize=64)
def coefficients(grid: tuple[float, ...], order: int) -> GDDIMCoefficients:
    """Precompute the gDDIM coefficients for a time grid (a tuple, so it can key the cache) and an order."""
    steps = []
    for k, (t, s) in enumerate(zip(grid, grid[1:])):
        p = min(order, k)
        nodes = tuple(grid[k - j] for j in range(p + 1))  # current time first, then earlier (larger) times
        data_end = s == 0.0
        alpha_s = 1.0 if data_end else float(alpha_sigma(logsnr(torch.tensor(s, dtype=torch.float64)))[0])
        c = integral_coefficients(nodes, t, s, data_end=data_end) if p > 0 else np.zeros(1)
        steps.append(StepCoefficients(t, s, data_end, tuple(float(alpha_s * cj) for cj in c[1:])))
    return GDDIMCoefficients(grid, order, tuple(steps))


def gddim_step(st: StepCoefficients, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               history: list[torch.Tensor]) -> torch.Tensor:
    """One gDDIM step: the DDIM step with the current (x̂₀, ε̂) plus Σ_j α_s C_j (ε̂_j − ε̂_0) over `history` (ε̂ of
    earlier steps, most recent first; only the first len(st.history) are used)."""
    x_next = x0 if st.data_end else ddim_step(x, x0, _tfull(st.t, x), _tfull(st.s, x))
    for w, eps_j in zip(st.history, history):
        x_next = x_next + w * (eps_j - eps)
    return x_next


class GDDIM:
    """gDDIM of order `order` on the VP process (module docstring for the maths and the decisions)."""

    name = "gddim"

    def __init__(self, *, order: int = 2, clip: bool = True):
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"gDDIM order must be a non-negative int, got {order!r}")
        self.order = order
        self.clip = clip

    @torch.no_grad()
    def __call__(self, denoise, noise, grid_or_steps, *, y=None, callback=None):
        grid = time_grid(grid_or_steps)
        if self.order > len(grid) - 2:
            raise ValueError(f"gDDIM order {self.order} needs at least {self.order + 1} steps to be reached, "
                             f"the grid has {len(grid) - 1}")
        coef = coefficients(grid, self.order)
        x = noise
        history: list[torch.Tensor] = []  # ε̂ of earlier steps, most recent first
        for i, st in enumerate(coef.steps):
            t = _tfull(st.t, noise)
            x0, eps = predict(denoise, x, t, y, self.clip)
            x = gddim_step(st, x, x0, eps, history)
            history = [eps] + history[: self.order - 1] if self.order > 0 else []
            if callback is not None:
                callback(i, st.s, x)
        return x


register("gddim", GDDIM)
