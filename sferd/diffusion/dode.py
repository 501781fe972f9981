"""D-ODE calibration (Kim, Tang & Yu, CVPR 2024; baselines.md §5): one scalar λ per student step, fitted in closed
form so that a few-step solver follows the same solver run with K× more steps, and the corrected sampler `d_ddim`.

The correction (baselines.md §5, step 1). A base solver's step consumes a denoiser output D_i; D-ODE replaces it by

    D_i + λ_i (D_i − D_{i−1}),

where D_{i−1} is the *network's* output at the previous step (uncorrected: the λ's act on the update only, the
history is what the network said), and at the first step, which has no predecessor, D_i − x_i stands in for the
difference (the reference's rule for noise-prediction DDIM).

For D-DDIM, D is the noise prediction ε̂ (after clipping x̂₀ and re-deriving ε̂, when the sampler clips; the
corrected ε̂ is not re-clipped). The DDIM step is linear in ε̂ at fixed x_t: x_s = (α_s/α_t) x_t + α_s (ρ_s − ρ_t) ε̂
with ρ = σ/α, so the corrected step is

    x_s(λ) = x_s(0) + λ c ΔD,      c = α_s (ρ_s − ρ_t)    (c = −ρ_t on the last step to the data end, α = 1, σ = 0),

and x_s(0) is computed by the stable DDIM formula (`ddim_step`), so λ = 0 is the DDIM step to the last bit.

The fit (step 3). Along the student grid, greedily: from the current (already corrected) student state compute
x_s(0) and the direction d = c ΔD; the teacher's state at the same time is x^T; λ_i minimises ‖x^T − x_s(0) − λ d‖²
over the whole calibration batch, i.e.

    λ_i = ⟨x^T − x_s(0), d⟩ / ⟨d, d⟩     (float64 sums; 0 when d = 0).

The student then continues from x_s(λ_i). The two sums are accumulated over chunks of the batch and (in a
distributed stage) summed over processes with `reduce` before the division: the λ's are those of the one global
calibration batch whatever the chunking or process count (the released code fits per GPU; baselines.md pitfalls).
In the reference's EDM form the update is x_{i+1} += λ ΔD, i.e. c = 1; here c is the step's own ∂x_s/∂D.

The teacher (step 2): the same base solver on the student grid refined K times (an int N becomes the uniform grid
of K·N steps, so its times at every K-th point are the student's times exactly; an explicit grid is refined
uniformly in t inside each interval), targets are its states at every K-th point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sferd.diffusion.sampler import ddim_step
from sferd.diffusion.samplers import _tfull, predict, register, time_grid
from sferd.diffusion.schedule import alpha_sigma, logsnr

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _rho(t: float) -> float:
    lam = float(logsnr(torch.tensor(t, dtype=torch.float64)))
    return math.exp(-0.5 * lam)


class DDIMBase:
    """DDIM as a D-ODE base solver, D = ε̂ (module docstring)."""

    name = "ddim"

    def __init__(self, *, clip: bool = True):
        self.clip = clip

    def predict(self, denoise, x, t_value: float, y):
        """(x̂₀, D = ε̂) at (x, t)."""
        return predict(denoise, x, _tfull(t_value, x), y, self.clip)

    def step(self, x, x0, eps, t_value: float, s_value: float) -> torch.Tensor:
        """The uncorrected step; the data end returns x̂₀."""
        if s_value == 0.0:
            return x0
        return ddim_step(x, x0, _tfull(t_value, x), _tfull(s_value, x))

    def coefficient(self, t_value: float, s_value: float) -> float:
        """c = ∂x_s/∂ε̂ at fixed x_t: α_s (ρ_s − ρ_t), or −ρ_t to the data end (float64)."""
        if s_value == 0.0:
            return -_rho(t_value)
        alpha_s = float(alpha_sigma(logsnr(torch.tensor(s_value, dtype=torch.float64)))[0])
        return alpha_s * (_rho(s_value) - _rho(t_value))


BASES = {"ddim": DDIMBase}


def teacher_grid(grid_or_steps, factor: int) -> tuple[float, ...]:
    """The student grid refined `factor` times (module docstring)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the teacher factor K must be a positive int, got {factor!r}")
    if isinstance(grid_or_steps, int) and not isinstance(grid_or_steps, bool):
        return time_grid(grid_or_steps * factor)
    grid = time_grid(grid_or_steps)
    out = [grid[0]]
    for a, b in zip(grid, grid[1:]):
        out += [a + (b - a) * m / factor for m in range(1, factor)] + [b]
    return tuple(out)


def _chunks(n: int, chunks: int | Sequence[slice]) -> list[slice]:
    if isinstance(chunks, int):
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        edges = [round(k * n / chunks) for k in range(chunks + 1)]
        return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    return list(chunks)


@torch.no_grad()
def teacher_targets(base, denoise, noise, grid_or_steps, *, factor: int, y=None,
                    chunks: int | Sequence[slice] = 1) -> list[torch.Tensor]:
    """The teacher's states at the student's grid times after the start (one tensor per student step)."""
    tgrid = teacher_grid(grid_or_steps, factor)
    n_student = len(tgrid[::factor]) - 1
    out: list[list[torch.Tensor]] = [[] for _ in range(n_student)]
    for sl in _chunks(noise.shape[0], chunks):
        x, yc = noise[sl], (None if y is None else y[sl])
        for j, (tv, sv) in enumerate(zip(tgrid, tgrid[1:])):
            x0, eps = base.predict(denoise, x, tv, yc)
            x = base.step(x, x0, eps, tv, sv)
            if (j + 1) % factor == 0:
                out[(j + 1) // factor - 1].append(x)
    return [torch.cat(parts) for parts in out]


def _corrected(base, x, x0, eps, prev, tv, sv, lam):
    """(x_s(0), d = c ΔD, x_s(λ)) for one student step; ΔD = ε̂ − ε̂_prev, or ε̂ − x at the first step."""
    base_next = base.step(x, x0, eps, tv, sv)
    direction = base.coefficient(tv, sv) * (eps - (x if prev is None else prev))
    return base_next, direction, (base_next if lam == 0.0 else base_next + lam * direction)


@dataclass(frozen=True)
class Calibration:
    """The fitted λ's and the (float64) normal-equation sums they came from, per student step."""

    grid: tuple[float, ...]
    factor: int
    lambdas: tuple[float, ...]
    numerators: tuple[float, ...]
    denominators: tuple[float, ...]


@torch.no_grad()
def fit_lambdas(base, denoise, noise, grid_or_steps, targets: Sequence[torch.Tensor], *, y=None,
                chunks: int | Sequence[slice] = 1, reduce: Reduce | None = None, factor: int = 0) -> Calibration:
    """Greedy closed-form λ's along the student trajectory (module docstring). `reduce` sums the [num, den] float64
    pair across processes (an all-reduce); chunks simulate the split of the batch."""
    grid = time_grid(grid_or_steps)
    if len(targets) != len(grid) - 1:
        raise ValueError(f"{len(targets)} teacher targets for a {len(grid) - 1}-step student grid")
    parts = _chunks(noise.shape[0], chunks)
    xs = [noise[sl] for sl in parts]
    ys = [None if y is None else y[sl] for sl in parts]
    prevs: list[torch.Tensor | None] = [None] * len(parts)
    lambdas, nums, dens = [], [], []
    for i, (tv, sv) in enumerate(zip(grid, grid[1:])):
        sums = torch.zeros(2, dtype=torch.float64)
        pending = []
        for k, sl in enumerate(parts):
            x0, eps = base.predict(denoise, xs[k], tv, ys[k])
            base_next, direction, _ = _corrected(base, xs[k], x0, eps, prevs[k], tv, sv, 0.0)
            r = targets[i][sl].double() - base_next.double()
            d = direction.double()
            sums += torch.stack([(r * d).sum(), (d * d).sum()])
            pending.append((eps, base_next, direction))
        if reduce is not None:
            sums = reduce(sums)
        num, den = float(sums[0]), float(sums[1])
        lam = num / den if den > 0.0 else 0.0
        for k, (eps, base_next, direction) in enumerate(pending):
            xs[k] = base_next if lam == 0.0 else base_next + lam * direction
            prevs[k] = eps
        lambdas.append(lam)
        nums.append(num)
        dens.append(den)
    return Calibration(grid, factor, tuple(lambdas), tuple(nums), tuple(dens))


def calibrate(base, denoise, noise, grid_or_steps, *, factor: int, y=None, chunks: int | Sequence[slice] = 1,
              reduce: Reduce | None = None) -> Calibration:
    """Teacher run (K = `factor`) and greedy fit on one calibration batch `noise`."""
    targets = teacher_targets(base, denoise, noise, grid_or_steps, factor=factor, y=y, chunks=chunks)
    return fit_lambdas(base, denoise, noise, grid_or_steps, targets, y=y, chunks=chunks, reduce=reduce,
                       factor=factor)


class DODESampler:
    """A base solver with fitted λ's applied (the `d_ddim` sampler): one λ per step of the grid it is called on."""

    def __init__(self, *, lambdas: Sequence[float], base: str = "ddim", clip: bool = True):
        if base not in BASES:
            raise ValueError(f"unknown D-ODE base solver {base!r}; known: {sorted(BASES)}")
        self.lambdas = tuple(float(v) for v in lambdas)
        if not all(math.isfinite(v) for v in self.lambdas):
            raise ValueError(f"non-finite λ in {self.lambdas}")
        self.base = BASES[base](clip=clip)
        self.name = f"d_{base}"

    @torch.no_grad()
    def __call__(self, denoise, noise, grid_or_steps, *, y=None, callback=None):
        grid = time_grid(grid_or_steps)
        if len(grid) - 1 != len(self.lambdas):
            raise ValueError(f"{len(self.lambdas)} fitted λ's for a {len(grid) - 1}-step grid")
        x, prev = noise, None
        for i, (tv, sv) in enumerate(zip(grid, grid[1:])):
            x0, eps = self.base.predict(denoise, x, tv, y)
            _, _, x = _corrected(self.base, x, x0, eps, prev, tv, sv, self.lambdas[i])
            prev = eps
            if callback is not None:
                callback(i, sv, x)
        return x


def _d_ddim(**options) -> DODESampler:
    return DODESampler(base="ddim", **options)


register("d_ddim", _d_ddim)
