"""Critically-damped Langevin diffusion (CLD; Dockhorn, Vahdat & Kreis, ICLR 2022) and gDDIM on it (Zhang, Tao &
Chen, ICLR 2023; baselines.md §6).

The process. Each pixel x carries a velocity v; the augmented state u = (x, v) follows the linear SDE

    du = F u dt + G dw,   F = β [[0, M⁻¹], [−1, −Γ M⁻¹]],   G Gᵀ = [[0, 0], [0, 2 Γ β]],

with critical damping Γ² = 4M (so Γ = 2/√M⁻¹) and v₀ ~ N(0, γ M) independent of x₀. gDDIM's CIFAR-10 values are
M⁻¹ = 4, β = 4, γ = 0.04 (baselines.md §6), which give Γ = 1. F, G are constant in time, and the same 2×2 maths
applies to every pixel independently, so all matrices here are 2×2 (float64, numpy).

* Transition Ψ(t, s) = e^{F (t−s)}. Critical damping makes the eigenvalue μ = −β Γ M⁻¹ / 2 double and F − μI
  nilpotent ((F − μI)² = 0 follows from Γ² M⁻¹ = 4), so Ψ(t, s) = e^{μ(t−s)} (I + (t−s)(F − μI)) exactly.
* Conditional covariance given x₀: Σ_t = Ψ(t,0) Σ₀ Ψ(t,0)ᵀ + Q_t, Σ₀ = diag(0, γM), Q_t = ∫₀ᵗ Ψ(τ,0) G Gᵀ Ψ(τ,0)ᵀ dτ.
  The integrand is e^{2μτ} times a quadratic in τ, an entire function with |2μ t| ≤ 16 at t ≤ 1, so Gauss–Legendre
  with `NODES` nodes on [0, t] is exact to rounding; the closed form in incomplete-gamma terms cancels badly at
  small t (where R⁻¹ is largest), and a matrix exponential per call costs ~1 ms inside the R integration.
* Conditional mean: μ_t = Ψ(t,0) (x₀, 0).
* gDDIM's parameterisation K_t = R_t: u_t = μ_t + R_t ε with R_t R_tᵀ = Σ_t *and* dR/dt = (F + ½ G Gᵀ Σ_t⁻¹) R_t, so
  that along the exact probability flow of a point-mass x₀, ε stays constant (differentiate R Rᵀ to see that the ODE
  preserves R Rᵀ = Σ). The score is s = −R_t⁻ᵀ ε. Decision (the paper fixes only the ODE): R starts at t = 1 from
  the Cholesky factor of Σ₁ (where Σ is well conditioned, ≈ diag(1, M)) and is integrated down to `t_min` with an
  adaptive 8th-order Runge–Kutta (DOP853, rtol 1e-11) whose dense output gives R at any time. `cholesky(t)` is
  the Cholesky factor L_t (CLD's own "HSM" parameterisation), a different square root of Σ_t below t = 1.
* `t_min` > 0 is required: Σ₀ is singular (x has no noise at t = 0), so Σ⁻¹ and R⁻¹ blow up there.

The sampler. The probability flow du/dt = F u − ½ G Gᵀ s = F u + ½ G Gᵀ R_t⁻ᵀ ε, integrated exactly in its linear
part:

    u_s = Ψ(s,t) u_t + ∫_t^s Ψ(s,τ) ½ G Gᵀ R_τ⁻ᵀ ε(τ) dτ.

With ε replaced by the Lagrange polynomial in τ through the last q+1 predictions (current first), the step is
u_s = Ψ(s,t) u_t + Σ_j C_j ε̂_j with 2×2 matrices C_j = ∫_t^s Ψ(s,τ) ½GGᵀR_τ⁻ᵀ ℓ_j(τ) dτ. Because
d/dτ [Ψ(s,τ) R_τ] = Ψ(s,τ) ½GGᵀR_τ⁻ᵀ, the sum Σ_j C_j is exactly R_s − Ψ(s,t) R_t (gDDIM's order-0 step); the
step is written as that closed form times ε̂_0 plus quadrature weights C_j (j ≥ 1) on the differences ε̂_j − ε̂_0.
Quadrature: Gauss–Legendre (float64) in log τ, where R_τ⁻ᵀ ~ 1/τ near t_min becomes smooth. Step k uses order
min(q, k). Decision: an int step count means the grid quadratic in t from 1 to t_min (baselines.md §6: gDDIM's
grid is quadratic in t), t_i = t_min + (1 − t_min)(i/N)². The sampler returns the x component of the final state
(no extra denoising evaluation); `sample_state` returns the whole (x, v) state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp

from sferd.diffusion.gddim import NODES, lagrange_basis
from sferd.diffusion.samplers import register


def apply2(a: np.ndarray | torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A u for a 2×2 matrix A acting on the (x, v) axis (dim 1) of u, the same A at every pixel (cast to u's dtype).
    A of shape (B, 2, 2) acts per sample."""
    a = torch.as_tensor(a, dtype=u.dtype, device=u.device)
    if a.ndim == 2:
        return torch.einsum("ij,bj...->bi...", a, u)
    return torch.einsum("bij,bj...->bi...", a, u)


class CLD:
    """The CLD process (module docstring). All matrices float64 numpy, 2×2."""

    def __init__(self, *, t_min: float, m_inv: float = 4.0, beta: float = 4.0, gamma: float = 0.04):
        for name, v in (("t_min", t_min), ("m_inv", m_inv), ("beta", beta), ("gamma", gamma)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"CLD {name} must be a positive number, got {v!r}")
        if t_min >= 1:
            raise ValueError(f"CLD t_min must be < 1, got {t_min}")
        self.t_min, self.m_inv, self.beta, self.gamma = float(t_min), float(m_inv), float(beta), float(gamma)
        self.damping = 2.0 / math.sqrt(self.m_inv)  # Γ: critical damping Γ² = 4M
        self.F = self.beta * np.array([[0.0, self.m_inv], [-1.0, -self.damping * self.m_inv]])
        self.GG = np.array([[0.0, 0.0], [0.0, 2.0 * self.damping * self.beta]])
        self.sigma0 = np.diag([0.0, self.gamma / self.m_inv])  # v₀ ~ N(0, γM)
        self.eig = -0.5 * self.beta * self.damping * self.m_inv  # the double eigenvalue μ of F
        self._gl = np.polynomial.legendre.leggauss(NODES)
        self._R = self._solve_R()

    # -- forward process ---------------------------------------------------------------------------------------

    def psi(self, t: float, s: float) -> np.ndarray:
        """Ψ(t, s) = e^{F(t−s)} in closed form (critical damping)."""
        h = float(t) - float(s)
        return math.exp(self.eig * h) * (np.eye(2) + h * (self.F - self.eig * np.eye(2)))

    def sigma(self, t: float) -> np.ndarray:
        """Σ_t, the covariance of u_t given x₀ (module docstring)."""
        t = float(t)
        x, w = self._gl
        tau, wt = 0.5 * t * (x + 1.0), 0.5 * t * w
        nil = self.F - self.eig * np.eye(2)
        ps = np.exp(self.eig * tau)[:, None, None] * (np.eye(2) + tau[:, None, None] * nil)  # Ψ(τ,0), (n, 2, 2)
        q = np.einsum("n,nab,bc,ndc->ad", wt, ps, self.GG, ps)
        p = self.psi(t, 0.0)
        s = p @ self.sigma0 @ p.T + q
        return 0.5 * (s + s.T)  # symmetric to the last bit

    def cholesky(self, t: float) -> np.ndarray:
        """L_t: the lower-triangular square root of Σ_t."""
        return np.linalg.cholesky(self.sigma(t))

    def _solve_R(self):
        def rhs(t, r):
            rm = r.reshape(2, 2)
            (a, b), (_, d) = self.sigma(t)
            inv = np.array([[d, -b], [-b, a]]) / (a * d - b * b)  # 2×2 inverse by hand: no LAPACK call per step
            return ((self.F + 0.5 * self.GG @ inv) @ rm).reshape(-1)

        sol = solve_ivp(rhs, (1.0, self.t_min), self.cholesky(1.0).reshape(-1), method="DOP853", rtol=1e-11,
                        atol=1e-14, dense_output=True)
        if not sol.success:
            raise RuntimeError(f"integrating gDDIM's R_t failed: {sol.message}")
        return sol.sol

    def R(self, t: float | np.ndarray) -> np.ndarray:
        """R_t (2×2), or (n, 2, 2) for an array of times in [t_min, 1]."""
        ts = np.asarray(t, dtype=np.float64)
        if np.any(ts < self.t_min * (1 - 1e-12)) or np.any(ts > 1.0 + 1e-12):
            raise ValueError(f"R_t is available on [t_min, 1] = [{self.t_min}, 1], got {t}")
        out = self._R(np.clip(ts.reshape(-1), self.t_min, 1.0)).T.reshape(-1, 2, 2)
        return out[0] if ts.ndim == 0 else out

    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """μ_t = Ψ(t,0)(x₀, 0) for per-sample times t (B,), as a (B, 2, …) state."""
        p = np.stack([self.psi(float(tv), 0.0) for tv in t.double().tolist()])
        return apply2(p, torch.stack([x0, torch.zeros_like(x0)], dim=1))

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """u_t = μ_t + R_t ε for per-sample t (B,) and ε (B, 2, …) ~ N(0, I): the training input whose target is ε."""
        return self.mean(x0, t) + apply2(self.R(t.double().numpy()), eps)

    # -- gDDIM -------------------------------------------------------------------------------------------------

    def quadratic_grid(self, steps: int) -> tuple[float, ...]:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return tuple(self.t_min + (1.0 - self.t_min) * (i / steps) ** 2 for i in range(steps, -1, -1))

    def grid(self, grid_or_steps) -> tuple[float, ...]:
        if isinstance(grid_or_steps, int) and not isinstance(grid_or_steps, bool):
            return self.quadratic_grid(grid_or_steps)
        g = tuple(float(v) for v in (grid_or_steps.tolist() if isinstance(grid_or_steps, torch.Tensor)
                                     else grid_or_steps))
        if len(g) < 2 or any(b >= a for a, b in zip(g, g[1:])) or g[0] > 1.0 or g[-1] < self.t_min:
            raise ValueError(f"a CLD grid must decrease strictly within [t_min, 1] = [{self.t_min}, 1], got {g}")
        return g

    def integral_coefficients(self, nodes: Sequence[float], t: float, s: float) -> np.ndarray:
        """C_j = ∫_t^s Ψ(s,τ) ½GGᵀ R_τ⁻ᵀ ℓ_j(τ) dτ, shape (len(nodes), 2, 2), by Gauss–Legendre in log τ."""
        x, w = np.polynomial.legendre.leggauss(NODES)
        a, b = math.log(t), math.log(s)
        tau = np.exp(0.5 * (b - a) * x + 0.5 * (a + b))
        weights = 0.5 * (b - a) * w * tau  # dτ = τ d(log τ)
        r_inv_t = np.linalg.inv(self.R(tau)).transpose(0, 2, 1)
        kernel = np.stack([self.psi(s, tv) for tv in tau]) @ (0.5 * self.GG) @ r_inv_t  # (n, 2, 2)
        basis = lagrange_basis(np.asarray(nodes), tau)  # (q+1, n)
        return np.einsum("jn,n,nab->jab", basis, weights, kernel)

    @functools.lru_cache(maxsize=32)
    def coefficients(self, grid: tuple[float, ...], order: int):
        """Per step: (t, s, Ψ(s,t), R_s − Ψ(s,t) R_t, (C_1, …, C_p)), float64."""
        steps = []
        for k, (t, s) in enumerate(zip(grid, grid[1:])):
            p = min(order, k)
            psi = self.psi(s, t)
            total = self.R(s) - psi @ self.R(t)
            hist = ()
            if p > 0:
                c = self.integral_coefficients([grid[k - j] for j in range(p + 1)], t, s)
                hist = tuple(c[1:])
            steps.append((t, s, psi, total, hist))
        return tuple(steps)


class CLDGDDIM:
    """gDDIM of order `order` on CLD. Called as every sampler: `(eps_model, noise, grid_or_steps, *, y, callback)`,
    where eps_model(u, t, y) → ε̂ of the augmented state (B, 2, …) and noise ~ N(0, I) of that shape; the start state
    is u₁ = R₁ noise (the prior N(0, Σ₁))."""

    name = "gddim_cld"

    def __init__(self, *, process: CLD, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"gDDIM order must be a non-negative int, got {order!r}")
        self.process, self.order = process, order

    @torch.no_grad()
    def sample_state(self, eps_model, noise, grid_or_steps, *, y=None, callback=None) -> torch.Tensor:
        grid = self.process.grid(grid_or_steps)
        if self.order > len(grid) - 2:
            raise ValueError(f"gDDIM order {self.order} needs at least {self.order + 1} steps to be reached, "
                             f"the grid has {len(grid) - 1}")
        if noise.ndim < 2 or noise.shape[1] != 2:
            raise ValueError(f"CLD noise must have the (x, v) axis at dim 1 of size 2, got shape {tuple(noise.shape)}")
        u = apply2(self.process.R(grid[0]), noise)
        history: list[torch.Tensor] = []
        for i, (t, s, psi, total, hist) in enumerate(self.process.coefficients(grid, self.order)):
            eps = eps_model(u, torch.full((u.shape[0],), t, dtype=u.dtype, device=u.device), y)
            u_next = apply2(psi, u) + apply2(total, eps)
            for c, eps_j in zip(hist, history):
                u_next = u_next + apply2(c, eps_j - eps)
            u = u_next
            history = [eps] + history[: self.order - 1] if self.order > 0 else []
            if callback is not None:
                callback(i, s, u)
        return u

    def __call__(self, eps_model, noise, grid_or_steps, *, y=None, callback=None) -> torch.Tensor:
        return self.sample_state(eps_model, noise, grid_or_steps, y=y, callback=callback)[:, 0]


class CLDEuler:
    """Plain explicit Euler in t on the CLD probability flow du/dt = F u + ½ G Gᵀ R_t⁻ᵀ ε̂(u, t), on the same grids
    as `CLDGDDIM` (an int is the quadratic grid) and from the same start u₁ = R₁ noise: one ε̂ per step, so the NFE
    equals gDDIM's. gDDIM's baseline, the first-order method an exponential integrator is measured against; like
    `CLDGDDIM` it returns the x component of the state at the last grid time."""

    name = "euler_cld"

    def __init__(self, *, process: CLD):
        self.process = process

    @functools.lru_cache(maxsize=32)
    def _coefficients(self, grid: tuple[float, ...]):
        """Per step (t, s, I + (s − t) F, (s − t) ½ G Gᵀ R_t⁻ᵀ), float64."""
        out = []
        for t, s in zip(grid, grid[1:]):
            h = s - t
            out.append((t, s, np.eye(2) + h * self.process.F,
                        h * 0.5 * self.process.GG @ np.linalg.inv(self.process.R(t)).T))
        return tuple(out)

    @torch.no_grad()
    def sample_state(self, eps_model, noise, grid_or_steps, *, y=None, callback=None) -> torch.Tensor:
        grid = self.process.grid(grid_or_steps)
        if noise.ndim < 2 or noise.shape[1] != 2:
            raise ValueError(f"CLD noise must have the (x, v) axis at dim 1 of size 2, got shape {tuple(noise.shape)}")
        u = apply2(self.process.R(grid[0]), noise)
        for i, (t, s, lin, gain) in enumerate(self._coefficients(grid)):
            eps = eps_model(u, torch.full((u.shape[0],), t, dtype=u.dtype, device=u.device), y)
            u = apply2(lin, u) + apply2(gain, eps)
            if callback is not None:
                callback(i, s, u)
        return u

    def __call__(self, eps_model, noise, grid_or_steps, *, y=None, callback=None) -> torch.Tensor:
        return self.sample_state(eps_model, noise, grid_or_steps, y=y, callback=callback)[:, 0]


register("gddim_cld", CLDGDDIM)
register("euler_cld", CLDEuler)
