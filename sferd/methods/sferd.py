"""SFERD's semantic gradient predictor around a distilled student (sferd-method.md §7, §9(b), §10; D4, D5, D14, D15).

The student's x₀ prediction is shifted by a learned function G(x_t, z, t, y) (a gradient of log p(z | x_t) in
the paper's reading), scaled by a fixed positive coefficient c_t of the student's input time t (D4):

    x̂₀^S = x̂₀^θ(x_t, t, y) + c_t · G(x_t, z, t, y).

The shift parameterisation (D15, the spec's `predictor.shift_parameterization`) chooses c_t:

* ``x0_tweedie``  c_t = σ_t²/α_t. By Tweedie's formula a score shift ∇ log p(z | x_t) moves E[x₀ | x_t] by
  (σ_t²/α_t)·∇, so G is the gradient itself; in ε-space it is ε̂′ = ε̂ − σ_t·G. This is the released SFERD/PDAE
  form. It is badly conditioned: c_t runs from ~2e-9 at t = 0 to e¹⁰ ≈ 22026 at t = 1, the first step of
  every sampler and the only step of the 1-step student, and Adam moves each weight by ~lr whatever the
  gradient's size, so one update moves the 1-step shift by ~lr·22026.
* ``x0_direct``   c_t = 1. G is the x₀-space shift itself: x̂₀^S = x̂₀^θ + G (ε̂′ = ε̂ − (α_t/σ_t)·G).
* ``v_direct``    c_t = σ_t. G is a shift of the v prediction, v̂′ = v̂ − G: since x̂₀ = α_t x_t − σ_t v̂ this is
  x̂₀^S = x̂₀^θ + σ_t·G (ε̂′ = ε̂ − α_t·G). Like the Tweedie form it vanishes as t → 0 (a nearly clean image is
  hardly corrected), but c_t ≤ 1, and the gradient reaching G under the max(SNR, 1) weight,
  2·σ_t·max(SNR_t, 1)·(x̂₀^S − x̃), is σ_t·(x-residual) for SNR ≤ 1 and α_t·(ε-residual) above: of order one at
  every time step. This is the ε/v-space form with a per-step-O(1) gradient that issue 11 asks for.

Why the forms are one method. For every t, c_t > 0 is a fixed, known function of t, and G is a (universal)
function of (x_t, z, t, y), t included: for any G the shift c_t·G equals G′ := c_t·G, a function of the same
arguments, and for any G′ it equals c_t·(G′/c_t). So {c_t·G} over all G and {G′} over all G′ are the same set of
shifts, for any two choices of c_t; the forms differ only in how a finite network trained by Adam reaches a
given shift. The objective is the same for all of them, too: stage (b) minimises max(SNR_t, 1)·‖x̂₀^S − x̃‖² on
the PD target x̃ whatever the form (the weight is not changed per form: that would change what is learned).

Why no reweighted ε form: at K = 1 there is a single time step (t = 1), so any per-step loss weight is a
constant factor, and Adam's update does not depend on a constant factor of the loss. An ε-space shift
ε̂′ = ε̂ − σ_t·G (or − G) moves x̂₀ by σ_t²/α_t·G (or σ_t/α_t·G), ≈ e¹⁰·G at t = 1, whatever the weighting: it is
``x0_tweedie`` (or as ill-conditioned) exactly where it matters.

Training (stage b): the student S_K and its teacher T_2K are frozen; the encoder E and the predictor G learn the
same PD target x̃ (from the guided T_2K, on S_K's grid) under the same max(SNR, 1) weight.
Sampling: z comes from the latent prior; the shift is on for the first K − ⌊fraction·K⌋ steps and off for the
rest (the released SFERD sampler rule). The form is recorded in `predictor.pt` and sampling refuses a
checkpoint trained with another one.
"""

from __future__ import annotations

import math

import torch

from sferd.diffusion.denoiser import Denoiser
from sferd.diffusion.losses import weighted_x_mse
from sferd.diffusion.parameterization import to_x0_eps
from sferd.diffusion.basic_samplers import DDIM  # not the registry: see basic_samplers
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, time_input
from sferd.methods.draws import Draws
from sferd.methods.pd import pd_target, sample_training_point


# The spec's `predictor.shift_parameterization` values (sferd.spec.models.ShiftParameterization; a test keeps the
# two lists equal — the spec package must not import torch, so it cannot import this module).
SHIFT_PARAMETERIZATIONS: tuple[str, ...] = ("x0_tweedie", "x0_direct", "v_direct")

# Checkpoints written before the field existed were all trained with the released form.
LEGACY_SHIFT_PARAMETERIZATION = "x0_tweedie"


def check_shift_parameterization(shift_parameterization: str) -> str:
    if shift_parameterization not in SHIFT_PARAMETERIZATIONS:
        raise ValueError(
            f"unknown shift parameterisation {shift_parameterization!r}; expected one of {SHIFT_PARAMETERIZATIONS}"
        )
    return shift_parameterization


def shift_coefficient(lam: torch.Tensor, shift_parameterization: str) -> torch.Tensor:
    """c_t of the form (module docstring), from λ, computed in float64 and returned in λ's dtype.

    x0_tweedie: σ²/α = sigmoid(−λ)/√sigmoid(λ) (≈ e¹⁰ ≈ 22026 at t = 1); x0_direct: 1; v_direct: σ = √sigmoid(−λ).
    """
    check_shift_parameterization(shift_parameterization)
    lam = torch.as_tensor(lam)
    dtype = lam.dtype if lam.is_floating_point() else torch.float32
    lam64 = lam.double()
    if shift_parameterization == "x0_tweedie":
        c = torch.sigmoid(-lam64) / torch.sigmoid(lam64).sqrt()
    elif shift_parameterization == "x0_direct":
        c = torch.ones_like(lam64)
    else:  # v_direct
        c = torch.sigmoid(-lam64).sqrt()
    return c.to(dtype)


def trained_shift_parameterization(checkpoint: dict) -> str:
    """The form a `predictor.pt` was trained with (its own record; a checkpoint older than the field: x0_tweedie)."""
    recorded = checkpoint.get("shift_parameterization")
    if recorded is None:
        recorded = checkpoint.get("config", {}).get("predictor", {}).get(
            "shift_parameterization", LEGACY_SHIFT_PARAMETERIZATION)
    return recorded


def shift_active(step: int, num_steps: int, cutoff_fraction: float) -> bool:
    """Is the shift on at `step` (counted K down to 1)? On while step − 1 ≥ ⌊fraction·K⌋."""
    return step - 1 >= math.floor(cutoff_fraction * num_steps)


def shifted_steps(num_steps: int, cutoff_fraction: float) -> int:
    """How many of the K steps run the predictor branch (D14's `nfe_with_predictor` − K)."""
    return sum(shift_active(s, num_steps, cutoff_fraction) for s in range(num_steps, 0, -1))


def shifted_x0(
    predictor, parameterization: str, x_t, t, y, z, *, shift_parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀^S, x̂₀^θ) = (x̂₀^θ + c_t·G, x̂₀^θ) from one forward pass of the student trunk + predictor branch."""
    lam = logsnr(t)
    alpha, sigma = alpha_sigma(lam)
    a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
    student_out, g = predictor(x_t, time_input(lam), y, z)
    x0_theta, _ = to_x0_eps(parameterization, student_out, x_t, a, s)
    return x0_theta + broadcast(shift_coefficient(lam, shift_parameterization), x_t) * g, x0_theta


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
    shift_parameterization: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample max(SNR, 1)·‖x̂₀^θ + c_t G − x̃‖² (B,) on the student's grid, x̃ the PD target of the (guided)
    teacher T_2K; c_t is the form's (the loss itself is the same for every form)."""
    i, t, x_t = sample_training_point(x0, num_steps, draws)
    target = pd_target(teacher, x_t, i, num_steps, y)
    z = encoder(x0)  # the clean training image, as the data pipeline served it (flip included)
    x0_shifted, _ = shifted_x0(predictor, parameterization, x_t, t, y, z,
                               shift_parameterization=shift_parameterization)
    return weighted_x_mse(x0_shifted, target, logsnr(t), weighting)


class ShiftedStudent:
    """SFERD's student as a denoiser of the sampler family (sferd.diffusion.samplers), bound to one code z:
    (x_t, t, y) → (x̂₀, ε̂) with x̂₀ = x̂₀^θ + c_t·G while the shift is active on its K-step grid, the student alone
    after. Whether the shift is on depends on the step, so this denoiser is defined on the grid t = k/K only."""

    def __init__(self, *, predictor, student: torch.nn.Module, parameterization: str, z: torch.Tensor, num_steps: int,
                 cutoff_fraction: float, shift_parameterization: str):
        self.predictor, self.student, self.parameterization = predictor, student, parameterization
        self.z, self.num_steps, self.cutoff_fraction = z, num_steps, cutoff_fraction
        self.shift_parameterization = check_shift_parameterization(shift_parameterization)

    def _step(self, t: torch.Tensor) -> int:
        value = float(t.reshape(-1)[0])
        step = round(value * self.num_steps)
        if not torch.all(t == t.reshape(-1)[0]) or step / self.num_steps != value:
            raise ValueError(f"SFERD's shifted student samples on its {self.num_steps}-step grid t = k/{self.num_steps}, "
                             f"not at t = {value}")
        return step

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        lam = logsnr(t)
        alpha, sigma = alpha_sigma(lam)
        a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
        if shift_active(self._step(t), self.num_steps, self.cutoff_fraction):
            x0, _ = shifted_x0(self.predictor, self.parameterization, x_t, t, y, self.z,
                               shift_parameterization=self.shift_parameterization)
            return x0, (x_t - a * x0) / s
        return to_x0_eps(self.parameterization, self.student(x_t, time_input(lam), y), x_t, a, s)


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
    shift_parameterization: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """K DDIM steps of the shifted student (`ShiftedStudent`), x̂₀ clipped at every step; returns the last x̂₀.
    The sampler is the family's `ddim`, the one every other row of a table uses."""
    denoiser = ShiftedStudent(predictor=predictor, student=student, parameterization=parameterization, z=z,
                              num_steps=num_steps, cutoff_fraction=cutoff_fraction,
                              shift_parameterization=shift_parameterization)
    return DDIM(clip=True)(denoiser, noise, num_steps, y=y)
