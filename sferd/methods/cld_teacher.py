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
quantity leaves no conversion between training and sampling. Both halves of ε are regressed: the sampler's drift
½ G Gᵀ R_t⁻ᵀ ε̂ reads the v-row of R_t⁻ᵀ, which weighs both halves (at t = 10⁻³: −19 ε_x + 5 ε_v), whereas CLD's own
"hybrid score matching" regresses only the v-half of the noise of another square root of Σ_t (the Cholesky factor).

What makes it hard at small t: there Σ_t is nearly singular in x, the
x-row of R_t⁻¹ reaches ~10³, and ε_x is a high-gain function of u_t (the network must infer the displacement
u_x − x₀ at the scale of √Σ_xx ≈ 0.002 at t = 10⁻³). This is CLD's intrinsic difficulty, not this loss's.

The network. The suite's U-Net on 2C input channels (x then v, channel-stacked) with 2C outputs (ε of x then of
v) and the raw time t ∈ [t_min, 1] as its time input. With `mixed` (the spec's `mixed_score`, default on) its
output is added to A_t u, the exact ε of N(0, I) data (CLD's mixed score): the backward probability flow is only
marginally stable (gDDIM order 0 on Gaussian data with ε̂ scaled by 0.9 ends with 3.5× the spread), so a
network that must learn the whole stabilising linear response from scratch sends short-trained samplers off to
infinity, while the Gaussian part gives the right response from the first update and the network learns what the
data add to it. gDDIM's CIFAR-10 network is NCSN++ "deep" instead: specs
say so.
"""

from __future__ import annotations

import numpy as np
import torch

from sferd.diffusion.cld import CLD, apply2
from sferd.diffusion.gddim import NODES
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


def psi_from_zero(process: CLD, t: np.ndarray) -> np.ndarray:
    """Ψ(t, 0) for an array of times, (n, 2, 2): `CLD.psi`'s closed form, vectorised."""
    nil = process.F - process.eig * np.eye(2)
    return np.exp(process.eig * t)[:, None, None] * (np.eye(2) + t[:, None, None] * nil)


def sigma_many(process: CLD, t: np.ndarray) -> np.ndarray:
    """Σ_t for an array of times, (n, 2, 2): `CLD.sigma`'s Gauss–Legendre quadrature, vectorised over t (a training
    batch has one time per sample; the scalar version costs ~0.6 ms a call)."""
    x, w = np.polynomial.legendre.leggauss(NODES)
    tau = 0.5 * t[:, None] * (x[None, :] + 1.0)  # (n, k)
    wt = 0.5 * t[:, None] * w[None, :]
    nil = process.F - process.eig * np.eye(2)
    ps = np.exp(process.eig * tau)[..., None, None] * (np.eye(2) + tau[..., None, None] * nil)  # (n, k, 2, 2)
    q = np.einsum("nk,nkab,bc,nkdc->nad", wt, ps, process.GG, ps)
    p = psi_from_zero(process, t)
    s = p @ process.sigma0 @ p.transpose(0, 2, 1) + q
    return 0.5 * (s + s.transpose(0, 2, 1))


def mixed_matrices(process: CLD, t: torch.Tensor) -> np.ndarray:
    """A_t = R_tᵀ S_t⁻¹ (float64, (B, 2, 2)) with S_t = Σ_t + Ψ(t,0) diag(1, 0) Ψ(t,0)ᵀ: ε = A_t u exactly when the
    data are N(0, I) (then u_t ~ N(0, S_t), and E[ε | u] = R_tᵀ S_t⁻¹ u). CLD's mixed score (Dockhorn et al., ICLR
    2022, §3.2) in gDDIM's ε: the network learns only the residual over this Gaussian part."""
    tt = t.detach().double().cpu().numpy().reshape(-1)
    p = psi_from_zero(process, tt)
    s = sigma_many(process, tt) + p @ np.diag([1.0, 0.0]) @ p.transpose(0, 2, 1)
    return process.R(tt).reshape(-1, 2, 2).transpose(0, 2, 1) @ np.linalg.inv(s)


class EpsModel:
    """The sampler's view of a CLD network: (u (B, 2, C, H, W), t (B,), y) → ε̂ in the state layout. With
    `mixed` (the process is then required), ε̂ = A_t u + network output (`mixed_matrices`)."""

    def __init__(self, net: torch.nn.Module, *, process: CLD | None = None, mixed: bool = False):
        if mixed and process is None:
            raise ValueError("the mixed parameterisation needs the CLD process")
        self.net, self.process, self.mixed = net, process, mixed

    def __call__(self, u: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = to_state(self.net(to_channels(u), t.to(u.dtype), y))
        if self.mixed:
            out = out + apply2(mixed_matrices(self.process, t), u)
        return out


def perturb(process: CLD, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u_t = Ψ(t,0)(x₀, 0) + R_t ε for per-sample t (B,) and ε (B, 2, C, H, W); the 2×2 matrices are computed in
    float64 on the CPU, applied in u's dtype on its device."""
    tt = t.detach().double().cpu().numpy().reshape(-1)
    psi = psi_from_zero(process, tt)
    r = process.R(tt).reshape(-1, 2, 2)
    state0 = torch.stack([x0, torch.zeros_like(x0)], dim=1)
    return apply2(psi, state0) + apply2(r, eps)


def cld_teacher_loss(net: torch.nn.Module, process: CLD, x0: torch.Tensor, draws: Draws,
                     y: torch.Tensor | None = None, *, mixed: bool = False) -> torch.Tensor:
    """Per-sample loss (B,) of the module docstring; t and ε from each sample's draws (t first, then ε)."""
    # One time per sample, in the network's dtype: perturbation, matrices and network all see exactly this value,
    # which is never below t_min (the float nearest to t_min may lie below it: then the next one up is used; CLD.R
    # refuses times below t_min).
    t = (process.t_min + (1.0 - process.t_min) * draws.rand().double()).to(x0.dtype)
    floor = torch.tensor(process.t_min, dtype=x0.dtype)
    if float(floor) < process.t_min:
        floor = torch.nextafter(floor, torch.tensor(2.0, dtype=x0.dtype))
    t = torch.maximum(t, floor.to(t.device)).clamp(max=1.0)
    eps = draws.randn(2, *x0.shape[1:])
    u = perturb(process, x0, t.double(), eps).to(x0.dtype)
    pred = EpsModel(net, process=process, mixed=mixed)(u, t, y)
    return (pred.float() - eps).pow(2).flatten(1).mean(1)
