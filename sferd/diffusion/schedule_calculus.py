"""Derivatives and the inverse of the cosine logSNR schedule (`sferd.diffusion.schedule`), for samplers that
integrate in another variable than t.

Kept out of schedule.py on purpose: that file is a code dependency of every DVC stage (sferd.pipeline.codedeps), so
an addition there would make the committed dvc.lock stale and re-run the whole quickstart for no change in results.

With θ = a t + b the schedule is λ = −2 log tan θ, so ρ = σ/α = e^{−λ/2} = tan θ, α = cos θ, σ = sin θ.
"""

from __future__ import annotations

import torch

# The schedule's own constants (b = arctan e^{−λ_max/2}, a = arctan e^{−λ_min/2} − b); re-deriving them here would
# be a second copy of the formula that could drift from the first.
from sferd.diffusion.schedule import _A, _B, _out_dtype


def time_from_logsnr(lam: torch.Tensor) -> torch.Tensor:
    """The inverse of `logsnr`: t = (arctan(e^{−λ/2}) − b) / a. Float64 inside.

    Needed at every quadrature node of gDDIM, whose multistep interpolation is a polynomial in t while the
    integral runs in ρ or log ρ (`sferd.diffusion.gddim`). λ = +∞ (ρ = 0) maps to −b/a, just below t = 0.
    """
    lam = torch.as_tensor(lam)
    return ((torch.atan(torch.exp(-0.5 * lam.double())) - _B) / _A).to(_out_dtype(lam))


def dlogsnr_dt(t: torch.Tensor) -> torch.Tensor:
    """dλ/dt = −2a / (sin θ cos θ) = −4a / sin 2θ. Float64 inside.

    It is ≈ −7·10⁴ at t = 1, so callers multiply it by α σ (≈ 4.5·10⁻⁵ there) in float64 before it meets an
    image: ½ λ' α σ = −a at every t.
    """
    t = torch.as_tensor(t)
    theta = _A * t.double() + _B
    return (-4.0 * _A / torch.sin(2.0 * theta)).to(_out_dtype(t))
