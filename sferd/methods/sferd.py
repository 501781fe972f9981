"""SFERD's semantic gradient predictor around a distilled student (sferd-method.md §7, §9(b), §10; D4, D5, D14).

The student's x₀ prediction is shifted by a learned gradient of log p(z | x_t):

    x̂₀^S = x̂₀^θ(x_t, t, y) + c_t · G(x_t, z, t, y),   c_t = σ_t²/α_t at the student's input time (D4).

Training (stage b): the student S_K and its teacher T_2K are frozen; the encoder E and the predictor G learn the
same PD target x̃ (from the guided T_2K, on S_K's grid) under the same max(SNR, 1) weight.
Sampling: z comes from the latent prior; the shift is on for the first K − ⌊fraction·K⌋ steps and off for the
rest (the released SFERD sampler rule).
"""

from __future__ import annotations

import math

import torch

from sferd.diffusion.denoiser import Denoiser
from sferd.diffusion.losses import weighted_x_mse
from sferd.diffusion.parameterization import clip_x0, to_x0_eps
from sferd.diffusion.sampler import ddim_step
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, time_input
from sferd.methods.draws import Draws
from sferd.methods.pd import pd_target, sample_training_point


def shift_coefficient(lam: torch.Tensor) -> torch.Tensor:
    """c_t = σ_t²/α_t = sigmoid(−λ)/√sigmoid(λ), in float32 from λ (≈ e¹⁰ ≈ 22026 at t = 1)."""
    lam = lam.to(torch.float32)
    return torch.sigmoid(-lam) / torch.sigmoid(lam).sqrt()


def shift_active(step: int, num_steps: int, cutoff_fraction: float) -> bool:
    """Is the shift on at `step` (counted K down to 1)? On while step − 1 ≥ ⌊fraction·K⌋."""
    return step - 1 >= math.floor(cutoff_fraction * num_steps)


def shifted_steps(num_steps: int, cutoff_fraction: float) -> int:
    """How many of the K steps run the predictor branch (D14's `nfe_with_predictor` − K)."""
    return sum(shift_active(s, num_steps, cutoff_fraction) for s in range(num_steps, 0, -1))


def shifted_x0(predictor, parameterization: str, x_t, t, y, z) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀^S, x̂₀^θ) from one forward pass of the student trunk + predictor branch."""
    lam = logsnr(t)
    alpha, sigma = alpha_sigma(lam)
    a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
    student_out, g = predictor(x_t, time_input(lam), y, z)
    x0_theta, _ = to_x0_eps(parameterization, student_out, x_t, a, s)
    return x0_theta + broadcast(shift_coefficient(lam), x_t) * g, x0_theta


def predictor_loss(
    *,
    encoder: torch.nn.Module,
    predictor: torch.nn.Module,
    teacher: Denoiser,
    parameterization: str,
    x0: torch.Tensor,
    num_steps: int,
    draws: Draws,
    weighting: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample max(SNR, 1)·‖x̂₀^θ + c_t G − x̃‖² (B,) on the student's grid, x̃ the PD target of the (guided)
    teacher T_2K."""
    i, t, x_t = sample_training_point(x0, num_steps, draws)
    target = pd_target(teacher, x_t, i, num_steps, y)
    z = encoder(x0)  # the clean training image, as the data pipeline served it (flip included)
    x0_shifted, _ = shifted_x0(predictor, parameterization, x_t, t, y, z)
    return weighted_x_mse(x0_shifted, target, logsnr(t), weighting)


@torch.no_grad()
def sample_sferd(
    *,
    predictor,
    student: torch.nn.Module,
    parameterization: str,
    noise: torch.Tensor,
    z: torch.Tensor,
    num_steps: int,
    cutoff_fraction: float,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """K student DDIM steps with the shift while it is active; x̂₀ clipped at every step; returns the last x̂₀."""
    x = noise
    b = noise.shape[0]
    for step in range(num_steps, 0, -1):
        t = torch.full((b,), step / num_steps, dtype=noise.dtype, device=noise.device)
        lam = logsnr(t)
        alpha, sigma = alpha_sigma(lam)
        a, s = broadcast(alpha, x), broadcast(sigma, x)
        if shift_active(step, num_steps, cutoff_fraction):
            x0, _ = shifted_x0(predictor, parameterization, x, t, y, z)
        else:
            x0, _ = to_x0_eps(parameterization, student(x, time_input(lam), y), x, a, s)
        x0, _ = clip_x0(x0, x, a, s)
        if step == 1:
            return x0
        x = ddim_step(x, x0, t, torch.full((b,), (step - 1) / num_steps, dtype=noise.dtype, device=noise.device))
    raise AssertionError("unreachable")
