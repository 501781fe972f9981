"""SFERD's latent prior: a small DDPM over normalised semantic codes (sferd-method.md §8, §10; PDAE/DiffAE design).

At training time the student's gradient predictor is conditioned on z = E(x₀). At sampling time there is no x₀, so
z is drawn from this prior: latent DDIM (η = 0) from clamped Gaussian noise, then de-normalised with the training
set's per-dimension statistics (§10 steps 1–3).

Schedule and indexing (PDAE's latent diffusion):
* T = 1000 discrete steps, constant β = 0.008, indexed t ∈ {0, …, T−1} with ᾱ_t = Π_{s≤t}(1 − β) = (1 − β)^(t+1),
  the DDPM convention: t = 0 is already one noising step away from the data, and ᾱ_{T−1} = 0.992¹⁰⁰⁰ ≈ 3.2e-4
  (≈ e^{−8.03}), so z_{T−1} is N(0, I) up to a 1.8 % residual of the data.
* ε-prediction with an L1 loss mean|ε̂ − ε| and t ~ U{0, …, T−1} (PDAE).

DDIM step subsequence (the brief leaves this to us): ``steps`` S indices evenly spaced over the *whole* trained
range, both ends included, τ_k = round(k·(T−1)/(S−1)) for k = 0 … S−1, visited from τ_{S−1} = T−1 down to τ_0 = 0
(S = 1 → just T−1). Why:
* starting at T−1 (not PDAE-style "leading" 990 for S = 100, or 0 for S = 1) makes the first step see the noisiest
  trained level, the one that matches z_T ~ N(0, I) best; with leading spacing a 1-step sampler would start at
  t = 0 from pure noise;
* ending at 0 makes the last network call the least-noisy trained level, and its predicted z₀ is what is returned
  (the final "step to t = −1", ᾱ = 1, is exactly x̂₀). With S = 100 the grid is 0, 10, 20, …, 989, 999 (gaps of
  10.09 rounded), with S = T every step is visited.

Clamping (PDAE's sampler, SFERD default 1.0): the initial noise is clamped to [−clip_noise, clip_noise]; at each
step the predicted z₀ is clamped to [−clip_x0, clip_x0] and ε̂ is re-derived from it, so that the step stays on the
line between x̂₀ and z_t (the same rule as §2 for images). Either clamp can be disabled with None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sferd.methods.draws import Draws, GeneratorDraws

# model(z_t, t, y=None) -> ε̂; LatentMLP has this signature, and so can any exact/analytic predictor in tests.
EpsModel = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is element-wise, a generated __eq__ would be ambiguous
class LatentStats:
    """Per-dimension mean/std of the encoded training set; the prior lives in z_n = (z − mean)/std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ValueError(f"LatentStats needs 1-D mean and std of equal shape, got {tuple(self.mean.shape)} "
                             f"and {tuple(self.std.shape)}")
        if not bool((self.std > 0).all()):
            raise ValueError("LatentStats.std must be > 0 in every dimension")

    @staticmethod
    def fit(codes: torch.Tensor, eps: float = 1e-6) -> "LatentStats":
        """Statistics of ``codes`` (N, D). std is unbiased (torch's default, as PDAE) and floored at ``eps``.

        The floor matters for codes with a dead (constant) dimension: dividing by 0 would make z_n NaN/inf there.
        With the floor such a dimension normalises to exactly 0, and de-normalises back to its constant.
        """
        if codes.ndim != 2 or codes.shape[0] < 2:
            raise ValueError(f"LatentStats.fit needs codes of shape (N >= 2, D), got {tuple(codes.shape)}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        # Accumulate in float64: the training set has ~50k codes and a float32 sum loses digits of the mean.
        c = codes.detach().to(torch.float64)
        mean = c.mean(dim=0)
        std = c.std(dim=0).clamp_min(eps)
        return LatentStats(mean=mean.to(torch.float32).cpu(), std=std.to(torch.float32).cpu())

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z_n: torch.Tensor) -> torch.Tensor:
        return z_n * self.std.to(z_n) + self.mean.to(z_n)

    def state_dict(self) -> dict:
        return {"mean": self.mean.detach().clone().cpu(), "std": self.std.detach().clone().cpu()}

    @staticmethod
    def from_state_dict(d: dict) -> "LatentStats":
        if set(d) != {"mean", "std"}:
            raise ValueError(f"LatentStats state dict needs exactly the keys 'mean' and 'std', got {sorted(d)}")
        return LatentStats(mean=torch.as_tensor(d["mean"]).clone(), std=torch.as_tensor(d["std"]).clone())


class LatentDiffusion:
    """Discrete DDPM over z_n with constant β (PDAE's latent diffusion): q_sample, L1 ε-loss, DDIM (η = 0)."""

    def __init__(self, num_steps: int = 1000, beta: float = 0.008):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.num_steps = num_steps
        self.beta = beta
        # float64 for the product (1000 factors), float32 for use: the coefficients then match what a float32
        # network sees, and are the same on every device.
        betas = torch.full((num_steps,), beta, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ᾱ_t = (1 − β)^(t+1), float64
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt().to(torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt().to(torch.float32)

    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, …) to broadcast against ``like``."""
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
        if bool((t < 0).any()) or bool((t >= self.num_steps).any()):
            raise ValueError(f"t must lie in 0 … {self.num_steps - 1}")
        c = table.to(like.device)[t.to(like.device)].to(like.dtype)
        return c.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε."""
        return (self._coef(self.sqrt_alphas_cumprod, t, z0) * z0
                + self._coef(self.sqrt_one_minus_alphas_cumprod, t, z0) * noise)

    def loss(self, model: EpsModel, z0: torch.Tensor, *, draws: Draws, y: torch.Tensor | None = None) -> torch.Tensor:
        """PDAE's latent objective per sample, mean over dimensions of |ε̂(z_t, t, y) − ε| (B,), with
        t ~ U{0 … T−1} and ε ~ N(0, I) from each sample's draws (the training engine sums over the batch)."""
        t = draws.randint(0, self.num_steps).to(z0.device)
        noise = draws.randn(*z0.shape[1:]).to(device=z0.device, dtype=z0.dtype)
        eps_hat = model(self.q_sample(z0, t, noise), t, y=y)
        return (eps_hat.float() - noise.float()).abs().flatten(1).mean(dim=1)

    def timesteps(self, steps: int) -> list[int]:
        """The DDIM subsequence, in visiting order (descending): round(k·(T−1)/(S−1)), k = S−1 … 0.

        Integer arithmetic (round half up) so the grid cannot depend on float rounding. For S ≤ T consecutive
        real grid points are ≥ 1 apart, so the rounded indices are distinct.
        """
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in 1 … {self.num_steps}, got {steps}")
        if steps == 1:
            return [self.num_steps - 1]
        last, n = self.num_steps - 1, steps - 1
        return [(2 * k * last + n) // (2 * n) for k in range(n, -1, -1)]

    @torch.no_grad()
    def ddim_sample(self, model: EpsModel, noise: torch.Tensor, *, steps: int = 100, y: torch.Tensor | None = None,
                    clip_noise: float | None = 1.0, clip_x0: float | None = 1.0) -> torch.Tensor:
        """Deterministic DDIM (η = 0) from ``noise`` (B, D) over ``timesteps(steps)``; returns the final ẑ₀.

        The model is used as given (call ``.eval()`` first for an EMA/inference model; dropout is 0 by default).
        """
        for name, value in (("clip_noise", clip_noise), ("clip_x0", clip_x0)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        taus = self.timesteps(steps)
        z = noise if clip_noise is None else noise.clamp(-clip_noise, clip_noise)
        b = z.shape[0]
        sa, s1a = self.sqrt_alphas_cumprod.tolist(), self.sqrt_one_minus_alphas_cumprod.tolist()
        for i, tau in enumerate(taus):
            t = torch.full((b,), tau, dtype=torch.long, device=z.device)
            eps = model(z, t, y=y)
            x0 = (z - s1a[tau] * eps) / sa[tau]
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                # Re-derive ε̂ so the next point still satisfies z_t = √ᾱ x̂₀ + √(1−ᾱ) ε̂ with the clamped x̂₀.
                eps = (z - sa[tau] * x0) / s1a[tau]
            if i == len(taus) - 1:
                return x0  # the step to ᾱ = 1: the result is x̂₀ itself
            nxt = taus[i + 1]
            z = sa[nxt] * x0 + s1a[nxt] * eps
        raise AssertionError("unreachable: timesteps() is never empty")


def train_prior_step(model: torch.nn.Module, diffusion: LatentDiffusion, batch_z_n: torch.Tensor,
                     optimizer: torch.optim.Optimizer, *, generator: torch.Generator, y: torch.Tensor | None = None,
                     grad_clip_norm: float | None = 1.0) -> float:
    """One optimiser update of the prior on a batch of normalised codes; returns the batch loss (before the update).

    The caller owns the optimiser (PDAE: AdamW lr 1e-3, weight decay 0.01), the batch (512) and the EMA (0.9999).
    Gradient clipping at norm 1 is the project's training-loop default, kept here so both paths agree. (The prior
    stage trains through the engine in sferd/methods/training.py; this one-batch form serves tests and notebooks.)
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = diffusion.loss(model, batch_z_n, draws=GeneratorDraws(generator, batch_z_n.shape[0], batch_z_n.device),
                          y=y).mean()
    loss.backward()
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    return float(loss.detach())
