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
What remains split-dependent is only the network's own batch-size dependence (float32 kernels may round
differently for different batch shapes), not the fit: tests/test_dode.py checks 1e-12 agreement on a float64 model.
`reduce` receives a CPU float64 tensor; a distributed caller moves it to the backend's device (NCCL wants CUDA)
and back, and must call it on every rank at every step (it is collective).

Base solvers: DDIM (`d_ddim`) and gDDIM of order q (`d_gddim`, a DEIS-type multistep exponential integrator: the
higher-order base the issue asks for), whose c is α_s C_0, the weight of the current ε̂ in its step (`GDDIMBase`).
Its history keeps the network's ε̂, uncorrected, as the difference D_i − D_{i−1} does. Which teacher goes with which
student is the caller's choice (`calibrate(..., teacher=...)`; default: the student's own base solver).

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
from sferd.diffusion.gddim import coefficients as gddim_coefficients
from sferd.diffusion.gddim import gddim_step
from sferd.diffusion.basic_samplers import _tfull, predict, time_grid
from sferd.diffusion.samplers import register
from sferd.diffusion.schedule import alpha_sigma, logsnr

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _rho(t: float) -> float:
    lam = float(logsnr(torch.tensor(t, dtype=torch.float64)))
    return math.exp(-0.5 * lam)


def _ddim_coefficient(t_value: float, s_value: float) -> float:
    """∂x_s/∂ε̂ of the DDIM step at fixed x_t: α_s (ρ_s − ρ_t), or −ρ_t to the data end (float64)."""
    if s_value == 0.0:
        return -_rho(t_value)
    alpha_s = float(alpha_sigma(logsnr(torch.tensor(s_value, dtype=torch.float64)))[0])
    return alpha_s * (_rho(s_value) - _rho(t_value))


class DDIMBase:
    """DDIM as a D-ODE base solver, D = ε̂ (module docstring).

    A base solver is: `plan(grid)` (whatever it precomputes for a grid), `predict` → (x̂₀, D), `step(plan, k, x, x̂₀,
    D, history)` → the uncorrected state after step k (`history`: the network's D of earlier steps, most recent
    first), and `coefficient(plan, k)` = c, the scalar with x_s(D + δ) = x_s(D) + c δ at fixed x_t and history.
    """

    name = "ddim"
    history_length = 1  # D_{i−1}, for the difference only

    def __init__(self, *, clip: bool = True):
        self.clip = clip

    def plan(self, grid: tuple[float, ...]):
        return grid

    def predict(self, denoise, x, t_value: float, y):
        """(x̂₀, D = ε̂) at (x, t)."""
        return predict(denoise, x, _tfull(t_value, x), y, self.clip)

    def step(self, plan, k: int, x, x0, eps, history) -> torch.Tensor:
        t_value, s_value = plan[k], plan[k + 1]
        if s_value == 0.0:
            return x0
        return ddim_step(x, x0, _tfull(t_value, x), _tfull(s_value, x))

    def coefficient(self, plan, k: int) -> float:
        return _ddim_coefficient(plan[k], plan[k + 1])


class GDDIMBase(DDIMBase):
    """gDDIM of order q (`sferd.diffusion.gddim`, a DEIS-type multistep exponential integrator) as a D-ODE base,
    D = ε̂. Its step is DDIM(x̂₀_0) + Σ_{j≥1} w_j (ε̂_j − ε̂_0), so a change δ of the current ε̂ moves x_s by
    (α_s (ρ_s − ρ_t) − Σ_j w_j) δ = α_s C_0 δ: that is c. The history holds the network's ε̂ (uncorrected)."""

    name = "gddim"

    def __init__(self, *, order: int = 2, clip: bool = True):
        super().__init__(clip=clip)
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"gDDIM order must be a non-negative int, got {order!r}")
        self.order = order
        self.history_length = max(1, order)

    def plan(self, grid):
        if self.order > len(grid) - 2:
            raise ValueError(f"gDDIM order {self.order} needs at least {self.order + 1} steps to be reached, "
                             f"the grid has {len(grid) - 1}")
        return gddim_coefficients(grid, self.order)

    def step(self, plan, k, x, x0, eps, history):
        return gddim_step(plan.steps[k], x, x0, eps, history)

    def coefficient(self, plan, k):
        st = plan.steps[k]
        return _ddim_coefficient(st.t, st.s) - sum(st.history)


BASES = {"ddim": DDIMBase, "gddim": GDDIMBase}


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
    """The teacher's states at the student's grid times after the start (one tensor per student step): `base`
    (the teacher solver, which need not be the student's: D-DPM-Solver's teacher is DDIM) run uncorrected on the
    grid refined `factor` times."""
    tgrid = teacher_grid(grid_or_steps, factor)
    plan = base.plan(tgrid)
    n_student = len(tgrid[::factor]) - 1
    out: list[list[torch.Tensor]] = [[] for _ in range(n_student)]
    for sl in _chunks(noise.shape[0], chunks):
        x, yc, history = noise[sl], (None if y is None else y[sl]), []
        for j, tv in enumerate(tgrid[:-1]):
            x0, eps = base.predict(denoise, x, tv, yc)
            x = base.step(plan, j, x, x0, eps, history)
            history = [eps] + history[: base.history_length - 1]
            if (j + 1) % factor == 0:
                out[(j + 1) // factor - 1].append(x)
    return [torch.cat(parts) for parts in out]


def _corrected(base, plan, k, x, x0, eps, history, lam):
    """(x_s(0), d = c ΔD, x_s(λ)) for student step k; ΔD = ε̂ − ε̂_prev, or ε̂ − x at the first step."""
    base_next = base.step(plan, k, x, x0, eps, history)
    direction = base.coefficient(plan, k) * (eps - (history[0] if history else x))
    return base_next, direction, (base_next if lam == 0.0 else base_next + lam * direction)


@dataclass(frozen=True)
class Calibration:
    """The fitted λ's and the (float64) normal-equation sums they came from, per student step."""

    grid: tuple[float, ...]
    factor: int
    lambdas: tuple[float, ...]
    numerators: tuple[float, ...]
    denominators: tuple[float, ...]
    base: str = "ddim"

    def as_dict(self) -> dict:
        """The JSON-ready record a calibration stage writes (the released code never saves its λ's). Floats are
        Python floats, so `json.dumps` writes them with repr's round-trip precision."""
        return {"base": self.base, "factor": self.factor, "grid": list(self.grid), "lambdas": list(self.lambdas),
                "numerators": list(self.numerators), "denominators": list(self.denominators)}


@torch.no_grad()
def fit_lambdas(base, denoise, noise, grid_or_steps, targets: Sequence[torch.Tensor], *, y=None,
                chunks: int | Sequence[slice] = 1, reduce: Reduce | None = None, gather: Reduce | None = None,
                factor: int = 0) -> Calibration:
    """Greedy closed-form λ's along the student trajectory (module docstring). `reduce` sums the [num, den] float64
    pair across processes (an all-reduce); chunks split the local batch (memory, or to simulate processes).
    `gather` instead receives this process's per-chunk pairs (k×2) and returns every chunk's pair of the global
    batch (n×2, in the global chunk order), which are then summed one by one from zero exactly as one process sums
    its own chunks: the λ's are then bit-identical for any process count, not only equal to rounding (a float64
    all-reduce of partial sums adds in another order). `factor` is only recorded (0: unknown, when the targets came
    from elsewhere)."""
    if reduce is not None and gather is not None:
        raise ValueError("give `reduce` or `gather`, not both")
    grid = time_grid(grid_or_steps)
    if len(targets) != len(grid) - 1:
        raise ValueError(f"{len(targets)} teacher targets for a {len(grid) - 1}-step student grid")
    plan = base.plan(grid)
    parts = _chunks(noise.shape[0], chunks)
    xs = [noise[sl] for sl in parts]
    ys = [None if y is None else y[sl] for sl in parts]
    histories: list[list[torch.Tensor]] = [[] for _ in parts]
    lambdas, nums, dens = [], [], []
    for i, tv in enumerate(grid[:-1]):
        sums = torch.zeros(2, dtype=torch.float64)
        pending, rows = [], []
        for k, sl in enumerate(parts):
            x0, eps = base.predict(denoise, xs[k], tv, ys[k])
            base_next, direction, _ = _corrected(base, plan, i, xs[k], x0, eps, histories[k], 0.0)
            r = targets[i][sl].double() - base_next.double()
            d = direction.double()
            row = torch.stack([(r * d).sum(), (d * d).sum()]).cpu()
            if gather is None:
                sums += row
            rows.append(row)
            pending.append((eps, base_next, direction))
        if reduce is not None:
            sums = reduce(sums)
        if gather is not None:
            for row in gather(torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)):
                sums += row
        num, den = float(sums[0]), float(sums[1])
        lam = num / den if den > 0.0 else 0.0
        for k, (eps, base_next, direction) in enumerate(pending):
            xs[k] = base_next if lam == 0.0 else base_next + lam * direction
            histories[k] = [eps] + histories[k][: base.history_length - 1]
        lambdas.append(lam)
        nums.append(num)
        dens.append(den)
    label = base.name if not hasattr(base, "order") else f"{base.name}(order={base.order})"
    return Calibration(grid, factor, tuple(lambdas), tuple(nums), tuple(dens), label)


def calibrate(base, denoise, noise, grid_or_steps, *, factor: int, teacher=None, y=None,
              chunks: int | Sequence[slice] = 1, reduce: Reduce | None = None) -> Calibration:
    """Teacher run (K = `factor`; `teacher` defaults to the student's base solver) and greedy fit on one
    calibration batch `noise`."""
    targets = teacher_targets(base if teacher is None else teacher, denoise, noise, grid_or_steps, factor=factor,
                              y=y, chunks=chunks)
    return fit_lambdas(base, denoise, noise, grid_or_steps, targets, y=y, chunks=chunks, reduce=reduce,
                       factor=factor)


class DODESampler:
    """A base solver with fitted λ's applied (the `d_ddim` sampler): one λ per step of the grid it is called on."""

    def __init__(self, *, lambdas: Sequence[float], base: str = "ddim", clip: bool = True, **base_options):
        if base not in BASES:
            raise ValueError(f"unknown D-ODE base solver {base!r}; known: {sorted(BASES)}")
        self.lambdas = tuple(float(v) for v in lambdas)
        if not all(math.isfinite(v) for v in self.lambdas):
            raise ValueError(f"non-finite λ in {self.lambdas}")
        self.base = BASES[base](clip=clip, **base_options)
        self.name = f"d_{base}"

    @torch.no_grad()
    def __call__(self, denoise, noise, grid_or_steps, *, y=None, callback=None):
        grid = time_grid(grid_or_steps)
        if len(grid) - 1 != len(self.lambdas):
            raise ValueError(f"{len(self.lambdas)} fitted λ's for a {len(grid) - 1}-step grid")
        plan = self.base.plan(grid)
        x, history = noise, []
        for i, tv in enumerate(grid[:-1]):
            x0, eps = self.base.predict(denoise, x, tv, y)
            _, _, x = _corrected(self.base, plan, i, x, x0, eps, history, self.lambdas[i])
            history = [eps] + history[: self.base.history_length - 1]
            if callback is not None:
                callback(i, grid[i + 1], x)
        return x


def _d_ddim(**options) -> DODESampler:
    return DODESampler(base="ddim", **options)


def _d_gddim(**options) -> DODESampler:
    return DODESampler(base="gddim", **options)


register("d_ddim", _d_ddim)
register("d_gddim", _d_gddim)
