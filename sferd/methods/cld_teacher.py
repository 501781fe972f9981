"""The CLD teacher: a score model of critically-damped Langevin diffusion in gDDIM's R_t parameterisation
(sferd/diffusion/cld.py for the process; baselines.md §6).

The loss. For a training image x₀, a time t ~ U[t_min, 1] and ε ~ N(0, I) on both halves of the state, the
perturbed state is u_t = μ_t(x₀) + R_t ε (μ_t = Ψ(t,0)(x₀, 0); R_t R_tᵀ = Σ_t, the covariance of u_t given x₀,
which includes the random initial velocity v₀ ~ N(0, γM)). The network ε_θ(u_t, t) predicts ε, and the per-sample
loss is the plain mean of (ε_θ − ε)² over all 2·C·H·W entries, every t weighted equally.

Why this loss. gDDIM writes the score as s_θ = −R_t⁻ᵀ ε_θ. The denoising score-matching objective with the weight
matrix Λ_t = Σ_t = R_t R_tᵀ, E‖s_θ(u_t) − ∇ log p(u_t | x₀)‖²_{Λ_t}, is then exactly ‖ε_θ − ε‖²: the conditional
score is −Σ_t⁻¹(u_t − μ_t) = −R_t⁻ᵀ ε, and ‖R_tᵀ(R_t⁻ᵀ(ε − ε_θ))‖² = ‖ε − ε_θ‖². Weighting by Σ_t is what keeps the
target O(1) at every t: the score itself grows like R_t⁻¹ ~ 1/t near t_min. And ε_θ is what the gDDIM sampler
consumes directly (its order-0 step is exact when ε_θ is constant along the flow), so training the sampler's own
quantity leaves no conversion between training and sampling. Both halves of ε are regressed: the v-half alone
(CLD's "hybrid score matching") would need the Cholesky factor, not R_t, whose x-row has no noise on v.

The network. The suite's U-Net on 2C input channels (x then v, channel-stacked) with 2C outputs (ε of x then of
v) and the raw time t ∈ [t_min, 1] as its time input. gDDIM's CIFAR-10 network is NCSN++ "deep" instead: specs
say so.
"""

from __future__ import annotations

import numpy as np
import torch

from sferd.diffusion.cld import CLD, apply2
from sferd.methods.draws import Draws


def cld_process(process: dict) -> CLD:
    """The CLD of a stage's resolved `process` params (m_inv, beta, gamma, t_min)."""
    return CLD(t_min=process["t_min"], m_inv=process["m_inv"], beta=process["beta"], gamma=process["gamma"])


def to_state(u: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W) network layout → (B, 2, C, H, W) state layout (x channels first, then v)."""
    return u.reshape(u.shape[0], 2, u.shape[1] // 2, *u.shape[2:])


def to_channels(u: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, H, W) state → (B, 2C, H, W) network input."""
    return u.reshape(u.shape[0], 2 * u.shape[2], *u.shape[3:])


class EpsModel:
    """The sampler's view of a CLD network: (u (B, 2, C, H, W), t (B,), y) → ε̂ in the state layout."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def __call__(self, u: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return to_state(self.net(to_channels(u), t.to(u.dtype), y))


def perturb(process: CLD, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u_t = Ψ(t,0)(x₀, 0) + R_t ε for per-sample t (B,) and ε (B, 2, C, H, W); the 2×2 matrices are computed in
    float64 on the CPU, applied in u's dtype on its device."""
    tt = t.detach().double().cpu().numpy()
    psi = np.stack([process.psi(float(v), 0.0) for v in tt])
    r = process.R(tt).reshape(-1, 2, 2)
    state0 = torch.stack([x0, torch.zeros_like(x0)], dim=1)
    return apply2(psi, state0) + apply2(r, eps)


def cld_teacher_loss(net: torch.nn.Module, process: CLD, x0: torch.Tensor, draws: Draws,
                     y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,) of the module docstring; t and ε from each sample's draws (t first, then ε)."""
    # float64 times: the matrices are evaluated at exactly the t the network sees (as float32), never below t_min
    t = (process.t_min + (1.0 - process.t_min) * draws.rand().double()).clamp(process.t_min, 1.0)
    eps = draws.randn(2, *x0.shape[1:])
    u = perturb(process, x0, t, eps).to(x0.dtype)
    pred = EpsModel(net)(u, t.to(x0.dtype), y)
    return (pred.float() - eps).pow(2).flatten(1).mean(1)
