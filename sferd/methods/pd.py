"""Progressive distillation target and loss (Salimans & Ho, ICLR 2022; sferd-method.md §5, D2, D3, D11).

One halving turns a 2N-step teacher sampler into an N-step student. For t = i/N the teacher takes two
η = 0 DDIM sub-steps t → t − ½/N → t − 1/N with its *unclipped* x̂₀ (D11), landing on z″. The target x̃ is the
x₀ for which one student DDIM step from x_t lands exactly on z″:

    x̃ = (z″ − r x_t) / (α_{t″} − r α_t),   r = σ_{t″} / σ_t.

At i = 1 (t″ = 0) that formula is ill-conditioned, so x̃ is the teacher's x̂₀ from the second sub-step (PD
does the same). The teacher is any `Denoiser`: the plain network for PD, the attention-guided teacher for
SFERD-PD — the target is otherwise identical.
"""

from __future__ import annotations

import torch

from sferd.diffusion.denoiser import Denoiser
from sferd.diffusion.losses import weighted_x_mse
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, sigma_ratio
from sferd.methods.draws import Draws


@torch.no_grad()
def pd_target(
    teacher: Denoiser,
    x_t: torch.Tensor,
    i: torch.Tensor,
    num_steps: int,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form PD x-target for student grid index i ∈ {1..N} (per sample, LongTensor (B,))."""
    n = float(num_steps)
    # float64 t, hence float64 coefficients (sferd.diffusion.schedule): the denominator α_{t″} − r·α_t is O(1/N),
    # so float32 coefficients would put errors of ~N·6e-8 into x̃ (7.5e-4 at N = 4096). `broadcast` casts each
    # coefficient to the image's dtype once, where it meets the image; the teacher gets the same float64 t.
    t = i.to(torch.float64) / n
    t_mid = t - 0.5 / n
    t_end = t - 1.0 / n

    lam_t, lam_mid, lam_end = logsnr(t), logsnr(t_mid), logsnr(t_end)
    a_t, _ = alpha_sigma(lam_t)
    a_mid, s_mid = alpha_sigma(lam_mid)
    a_end, s_end = alpha_sigma(lam_end)

    x0_1, eps_1 = teacher(x_t, t, y)
    z_mid = broadcast(a_mid, x_t) * x0_1 + broadcast(s_mid, x_t) * eps_1
    x0_2, eps_2 = teacher(z_mid, t_mid, y)
    z_end = broadcast(a_end, x_t) * x0_2 + broadcast(s_end, x_t) * eps_2

    r = sigma_ratio(lam_end, lam_t)
    denom = a_end - r * a_t
    final = i == 1
    # Guard the division where the final-interval rule replaces it anyway (denominator → α₀ − σ₀/σ_t·α_t).
    safe = torch.where(final, torch.ones_like(denom), denom)
    x_tilde = (z_end - broadcast(r, x_t) * x_t) / broadcast(safe, x_t)
    return torch.where(broadcast(final, x_t), x0_2, x_tilde)


def sample_training_point(
    x0: torch.Tensor, num_steps: int, draws: Draws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw i ~ U{1..N}, ε ~ N(0, I) per sample and return (i, t, x_t) on the student's discrete grid."""
    i = draws.randint(1, num_steps + 1)
    t = i.to(torch.float32) / num_steps
    eps = draws.randn(*x0.shape[1:])
    alpha, sigma = alpha_sigma(logsnr(t))
    return i, t, broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps


def pd_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: torch.Tensor,
    num_steps: int,
    draws: Draws,
    *,
    weighting: str = "truncated_snr",
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample PD training loss (B,) on clean data x0 (student x̂₀ unclipped, weight applied once)."""
    i, t, x_t = sample_training_point(x0, num_steps, draws)
    target = pd_target(teacher, x_t, i, num_steps, y)
    x0_student, _ = student(x_t, t, y)
    return weighted_x_mse(x0_student, target, logsnr(t), weighting)
