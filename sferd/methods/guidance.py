"""Attention-guided teacher of SFERD (sferd-method.md §6; decisions D1, D9, D10, D11).

SFERD reduces the *teacher's* spatial fitting error with self-attention guidance (SAG, Hong et al., ICCV 2023)
inside distillation. One guided evaluation at (x_t, t, y) costs two network passes:

1. plain pass → raw x̂₀, ε̂ and the received attention c_j = Σ_i A_ij of one chosen attention block
   (mean over tokens is exactly 1, so ψ = 1 means "attended more than average");
2. mask M = 1[c > ψ], upsampled (nearest) from r×r to H×W; degrade the *clipped* prediction where the mask is on:
   x̃₀ = M ⊙ blur(clip(x̂₀)) + (1 − M) ⊙ clip(x̂₀) (D11), re-noise with the teacher's own noise,
   x̃_t = α_t x̃₀ + σ_t ε̂ = x_t + α_t (x̃₀ − x̂₀) (the stable form, no division);
3. second pass at x̃_t → x̂₀′; guided output ε_g = ε̂ + w (ε̂ − ε̃) (D1: scale 1 + w on the difference),
   in x-space x̂₀ᵍ = x̂₀ + w (x̃₀ − x̂₀′) — algebraically identical for every parameterization and free of the
   1/α_t ≈ 2·10⁴ at t = 1.

The guided teacher exposes the same `Denoiser` interface as a plain one, so the PD target is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sferd.diffusion.parameterization import to_x0_eps
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, time_input


@dataclass(frozen=True)
class GuidanceConfig:
    block: tuple[str, int, str | int]  # attention block (part, resolution, position), D9
    threshold: float = 1.0  # ψ (paper's best of 0.8–1.2)
    strength: float = 0.3  # w (paper's best of 0–0.5), D1
    blur_sigma: float = 3.0  # σ of the Gaussian blur (paper's best of 1, 3, 5)
    blur_kernel_size: int = 15  # D10

    @staticmethod
    def from_params(p: dict) -> "GuidanceConfig":
        b = p["attention_block"]
        return GuidanceConfig(
            block=(b["part"], int(b["resolution"]), b["position"]),
            threshold=float(p["threshold"]),
            strength=float(p["strength"]),
            blur_sigma=float(p["blur_sigma"]),
            blur_kernel_size=int(p["blur_kernel_size"]),
        )


def attention_mask(c: torch.Tensor, threshold: float, *, size: tuple[int, int], channels: int) -> torch.Tensor:
    """M (B, C, H, W) ∈ {0, 1}: tokens whose received attention exceeds ψ, nearest-upsampled to the image."""
    b, n = c.shape
    r = int(round(n**0.5))
    if r * r != n:
        raise ValueError(f"received attention over {n} tokens is not a square map")
    m = (c > threshold).to(torch.float32).reshape(b, 1, r, r)
    m = F.interpolate(m, size=size, mode="nearest")
    return m.expand(b, channels, *size)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable per-channel Gaussian blur with reflect padding (torchvision's implementation)."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    return tv_blur(x, kernel_size=[kernel_size, kernel_size], sigma=[sigma, sigma])


def degrade(x0: torch.Tensor, mask: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """x̃₀ = M ⊙ blur(clip(x̂₀)) + (1 − M) ⊙ clip(x̂₀): blur only where the teacher attends (D11: clipped)."""
    x0_clip = x0.clamp(-1.0, 1.0)
    return torch.where(mask.bool(), gaussian_blur(x0_clip, kernel_size, sigma), x0_clip)


class GuidedDenoiser:
    """(x_t, t, y) → guided (x̂₀ᵍ, ε̂ᵍ), unclipped, for a frozen U-Net teacher."""

    def __init__(self, net: torch.nn.Module, parameterization: str, config: GuidanceConfig):
        self.net, self.parameterization, self.config = net, parameterization, config
        self.last_mask: torch.Tensor | None = None  # for inspection and tests

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        cfg = self.config
        lam = logsnr(t)
        alpha, sigma = alpha_sigma(lam)
        a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
        u = time_input(lam)
        if cfg.strength == 0.0:
            # ε_g = ε̂ exactly: the second pass cannot change the result, so it is not paid for.
            return to_x0_eps(self.parameterization, self.net(x_t, u, y), x_t, a, s)
        out, c = self.net(x_t, u, y, capture=cfg.block)
        x0, _ = to_x0_eps(self.parameterization, out, x_t, a, s)
        mask = attention_mask(c, cfg.threshold, size=tuple(x_t.shape[-2:]), channels=x_t.shape[1])
        self.last_mask = mask
        x0_degraded = degrade(x0, mask, cfg.blur_kernel_size, cfg.blur_sigma)
        x_t_degraded = x_t + a * (x0_degraded - x0)
        x0_second, _ = to_x0_eps(self.parameterization, self.net(x_t_degraded, u, y), x_t_degraded, a, s)
        x0_guided = x0 + cfg.strength * (x0_degraded - x0_second)
        return x0_guided, (x_t - a * x0_guided) / s


def teacher_denoiser(net: torch.nn.Module, parameterization: str, guidance: dict | None):
    """The frozen teacher of a PD target: plain (PD) or attention-guided (SFERD), from a stage's `guidance` params."""
    from sferd.diffusion.denoiser import NetworkDenoiser

    if guidance is None:
        return NetworkDenoiser(net, parameterization)  # eval mode: no dropout in targets
    return GuidedDenoiser(net, parameterization, GuidanceConfig.from_params(guidance))
