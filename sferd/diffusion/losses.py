"""Diffusion training losses expressed on x̂₀ (sferd-method.md §4–5; PD Table 1).

`truncated_snr`: max(SNR_t, 1) · mean‖x̂₀ − x₀‖² — equivalently max(x-MSE, ε-MSE), PD's recommendation.
`snr_plus_one`: (1 + SNR_t) · mean‖x̂₀ − x₀‖², which equals the v-MSE because v̂ − v = −(x̂₀ − x₀)/σ_t.
The weight is applied once (D3): the released SFERD code squares (1 + SNR), giving 1/σ⁴.
"""

from __future__ import annotations

from typing import Literal

import torch

LossWeighting = Literal["truncated_snr", "snr_plus_one"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("truncated_snr", "snr_plus_one")


def snr_weight(kind: str, lam: torch.Tensor) -> torch.Tensor:
    snr = torch.exp(lam)
    if kind == "truncated_snr":
        return torch.clamp(snr, min=1.0)
    if kind == "snr_plus_one":
        return 1.0 + snr
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {LOSS_WEIGHTINGS}")


def weighted_x_mse(
    x0_pred: torch.Tensor, x0_target: torch.Tensor, lam: torch.Tensor, weighting: str
) -> torch.Tensor:
    """Per-sample w(λ) · mean-over-pixels squared error on x̂₀ (never clipped), shape (B,).

    Every training loss of the suite returns per-sample values: the training engine sums them over the global
    batch however the batch is split across processes and micro-batches (sferd/methods/training.py)."""
    per_sample = (x0_pred.float() - x0_target.float()).pow(2).flatten(1).mean(dim=1)
    return snr_weight(weighting, lam) * per_sample
