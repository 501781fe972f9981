"""One sampler family: every sampler is called as `sample(denoiser, noise, grid_or_steps, *, y=None, callback=None)`.

* `denoiser` is the suite's interface (x_t, t, y) → (x̂₀, ε̂) (`sferd.diffusion.denoiser`), unclipped.
* `grid_or_steps` is an int N — the uniform grid t_i = i/N, i = N … 0, the one `ddim_sample` walks — or an explicit
  strictly decreasing sequence of times in [0, 1].
* `callback(i, t, x)` is called after step i (0-based) with the time t reached and the state there.
* A grid that ends at t = 0 ends at the *data end*: the last step returns the sampler's data estimate (σ treated as
  0, α as 1), as `ddim_sample` returns x̂₀ rather than α₀x̂₀ + σ₀ε̂ (σ₀ ≈ 4.5e-5 would only add noise). A grid that
  ends at t > 0 returns the state x_t there.

Options that are not part of a call (clipping, order, fitted λ's) are bound when the sampler is made:
`make_sampler("gddim", order=2)`. A table row therefore names a sampler and a model and nothing else.

Names: `ddim`, `euler_pf`, `gddim` (`sferd.diffusion.gddim`), `d_ddim` and `d_gddim` (`sferd.diffusion.dode`),
`gddim_cld` and `euler_cld` (`sferd.diffusion.cld`; their "denoiser" is an ε-model of the augmented CLD state, not a
VP denoiser).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# the family's shared pieces and its first-order members live in basic_samplers (see there why); re-exported here
from sferd.diffusion.basic_samplers import (DDIM, Callback, EulerPF, Sampler, _tfull, pf_velocity_coefficient,  # noqa: F401
                                            predict, time_grid)

SAMPLERS: dict[str, Callable[..., Sampler]] = {}


def register(name: str, factory: Callable[..., Sampler]) -> None:
    if name in SAMPLERS and SAMPLERS[name] is not factory:
        raise ValueError(f"sampler {name!r} is already registered")
    SAMPLERS[name] = factory


def make_sampler(name: str, **options: Any) -> Sampler:
    """The sampler registered as `name`, with its options bound (e.g. `make_sampler("gddim", order=2)`)."""
    _load_builtin()
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name](**options)


def sampler_names() -> list[str]:
    _load_builtin()
    return sorted(SAMPLERS)


def _load_builtin() -> None:
    # gddim, dode and cld import this module; registering them lazily avoids an import cycle.
    import sferd.diffusion.cld  # noqa: F401
    import sferd.diffusion.dode  # noqa: F401
    import sferd.diffusion.gddim  # noqa: F401


register("ddim", DDIM)
register("euler_pf", EulerPF)
