"""Deterministic DDIM (η = 0) on the uniform grid t_i = i/N (sferd-method.md §3; Song et al. 2021, PD).

The last step returns x̂₀ itself rather than α₀x̂₀ + σ₀ε̂ (σ₀ ≈ 4.5e-5 would only add noise). At evaluation
x̂₀ is clipped at every step, as PD's `eval_clip_denoised`.
"""

from __future__ import annotations

import numpy as np
import torch

from sferd.diffusion.denoiser import Denoiser
from sferd.diffusion.parameterization import clip_x0
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, sigma_ratio


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = α_s x̂₀ + (σ_s/σ_t)(x_t − α_t x̂₀): one η = 0 step from t to s < t given x̂₀."""
    lam_t, lam_s = logsnr(t), logsnr(s)
    alpha_t, _ = alpha_sigma(lam_t)
    alpha_s, _ = alpha_sigma(lam_s)
    r = broadcast(sigma_ratio(lam_s, lam_t), x_t)
    return broadcast(alpha_s, x_t) * x0 + r * (x_t - broadcast(alpha_t, x_t) * x0)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    steps: int,
    *,
    y: torch.Tensor | None = None,
    clip: bool = True,
) -> torch.Tensor:
    """Run `steps` DDIM steps from x_1 = noise down to t = 0 and return x̂₀ of the last step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise
    b = noise.shape[0]
    for i in range(steps, 0, -1):
        t = torch.full((b,), i / steps, dtype=noise.dtype, device=noise.device)
        x0, _ = denoise(x, t, y)
        if clip:
            alpha, sigma = alpha_sigma(logsnr(t))
            x0, _ = clip_x0(x0, x, broadcast(alpha, x), broadcast(sigma, x))
        if i == 1:
            return x0
        x = ddim_step(x, x0, t, torch.full((b,), (i - 1) / steps, dtype=noise.dtype, device=noise.device))
    raise AssertionError("unreachable")


NOISE_STREAMS = {"image": 0, "latent": 1}


def per_sample_noise(seeds: np.ndarray | list[int], shape: tuple[int, ...], *, stream: str = "image") -> torch.Tensor:
    """Noise for each sample from its own seed, so a sample does not depend on batch size or sharding.

    Independent streams per seed (the image's x_1, SFERD's latent z_T) come from distinct generator seeds
    16·seed + stream, so no two (sample, stream) pairs share a generator.
    """
    out = torch.empty((len(seeds),) + tuple(shape))
    g = torch.Generator()
    offset = NOISE_STREAMS[stream]
    for k, seed in enumerate(seeds):
        g.manual_seed(16 * int(seed) + offset)
        out[k] = torch.randn(shape, generator=g)
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] B×C×H×W float → B×H×W×C uint8 via clamp(round(127.5 (x + 1)), 0, 255)."""
    q = torch.round(127.5 * (x.clamp(-1, 1) + 1.0)).clamp(0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()
