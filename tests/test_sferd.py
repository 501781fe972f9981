"""SFERD's shifted student (sferd-method.md §7, §9(b), §10): the shift coefficient σ_t²/α_t (D4), the
switch-off rule for the last ⌊fraction·K⌋ steps, the zero-initialised predictor leaving the student untouched,
the predictor loss on the PD target, and the D14 cost counts."""

from __future__ import annotations

import math

import pytest
import torch

from sferd.diffusion.denoiser import NetworkDenoiser
from sferd.diffusion.sampler import ddim_sample
from sferd.diffusion.schedule import alpha_sigma, logsnr, time_input
from sferd.methods.draws import GeneratorDraws
from sferd.methods.sferd import (
    SHIFT_PARAMETERIZATIONS,
    predictor_loss,
    sample_sferd,
    shift_active,
    shift_coefficient,
    shifted_steps,
    shifted_x0,
)
from sferd.nn.predictor import EncoderConfig, GradientPredictor, SemanticEncoder
from sferd.nn.unet import UNet, UNetConfig

CFG = UNetConfig(in_channels=1, out_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1, attention_resolutions=(4,), norm_groups=4)
LATENT = 6


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def _student(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(CFG)
    with torch.no_grad():  # move the zero-initialised layers off zero so the student is not trivially 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _perturbed_predictor(student: UNet, scale: float = 0.05) -> GradientPredictor:
    pred = GradientPredictor(student, latent_dim=LATENT)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pred.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return pred


# ------------------------------------------------------------------------------------------ shift coefficient


@pytest.mark.parametrize("t", [0.05, 0.25, 0.5, 0.75, 0.9])
def test_shift_coefficient_is_sigma2_over_alpha(t):
    lam = logsnr(torch.tensor([t], dtype=torch.float64))
    alpha, sigma = alpha_sigma(lam)
    expected = (sigma**2 / alpha).item()
    assert shift_coefficient(lam, "x0_tweedie").item() == pytest.approx(expected, rel=1e-6)


def test_shift_coefficient_at_t1_is_e10_and_finite():
    """t = 1 is the first step of every sampler and the only step of the 1-step student: λ = −20, c = e¹⁰."""
    c = shift_coefficient(logsnr(torch.tensor([1.0])), "x0_tweedie")
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    assert c.item() == pytest.approx(math.exp(10.0), rel=1e-5)
    # near t = 0 the shift vanishes (σ → 0): the predictor cannot move a nearly clean image
    assert shift_coefficient(logsnr(torch.tensor([0.0])), "x0_tweedie").item() < 1e-8


# ------------------------------------------------------------------------------------------ switch-off rule


@pytest.mark.parametrize(
    "k, expected_on",
    [
        (1, [True]),
        (2, [True, True]),
        (4, [True, True, True, False]),
        (8, [True] * 6 + [False] * 2),
    ],
)
def test_shift_is_on_exactly_on_the_expected_steps(k, expected_on):
    """Steps counted K down to 1; off for the last ⌊0.3K⌋ (§10: K = 1, 2 always on; 4: last off; 8: last 2 off)."""
    on = [shift_active(step, k, 0.3) for step in range(k, 0, -1)]
    assert on == expected_on
    assert shifted_steps(k, 0.3) == k - math.floor(0.3 * k)


def test_cutoff_extremes():
    assert shifted_steps(8, 0.0) == 8
    assert shifted_steps(8, 1.0) == 0


# ------------------------------------------------------------------------------------------ sampling


def _noise(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 8, 8, generator=g), torch.randn(batch, LATENT, generator=g))


@pytest.mark.parametrize("form", SHIFT_PARAMETERIZATIONS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_zero_initialised_predictor_samples_exactly_like_the_student(k, form):
    student = _student()
    pred = GradientPredictor(student, latent_dim=LATENT)
    noise, z = _noise()
    shifted = sample_sferd(predictor=pred, student=student, parameterization="x", noise=noise, z=z,
                           num_steps=k, cutoff_fraction=0.3, shift_parameterization=form)
    plain = ddim_sample(NetworkDenoiser(student, "x"), noise, k, clip=True)
    assert torch.equal(shifted, plain)


def test_trained_predictor_changes_samples_and_only_while_active():
    student = _student()
    pred = _perturbed_predictor(student)
    noise, z = _noise()
    plain = ddim_sample(NetworkDenoiser(student, "x"), noise, 4, clip=True)
    kwargs = dict(predictor=pred, student=student, parameterization="x", noise=noise, z=z, num_steps=4,
                  shift_parameterization="x0_tweedie")
    assert not torch.allclose(sample_sferd(**kwargs, cutoff_fraction=0.3), plain)
    assert torch.equal(sample_sferd(**kwargs, cutoff_fraction=1.0), plain)  # shift off on every step

    calls = []
    handle = pred.register_forward_hook(lambda *a: calls.append(1))
    try:
        sample_sferd(**kwargs, cutoff_fraction=0.3)
    finally:
        handle.remove()
    assert len(calls) == shifted_steps(4, 0.3) == 3  # D14: the predictor branch runs once per active step


def test_z_changes_the_shifted_sample():
    student = _student()
    pred = _perturbed_predictor(student)
    noise, z = _noise()
    kwargs = dict(predictor=pred, student=student, parameterization="x", noise=noise, num_steps=2, cutoff_fraction=0.3,
                  shift_parameterization="x0_tweedie")
    assert not torch.allclose(sample_sferd(**kwargs, z=z), sample_sferd(**kwargs, z=-z))


def test_shifted_x0_adds_c_times_g():
    student = _student()
    pred = _perturbed_predictor(student)
    noise, z = _noise()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    x0_s, x0_theta = shifted_x0(pred, "x", noise, t, None, z, shift_parameterization="x0_tweedie")
    _, g = pred(noise, time_input(logsnr(t)), None, z)
    c = shift_coefficient(logsnr(t), "x0_tweedie").view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_s, x0_theta + c * g)
    torch.testing.assert_close(x0_theta, student(noise, time_input(logsnr(t))))


# ------------------------------------------------------------------------------------------ training loss


def test_predictor_loss_trains_only_encoder_and_predictor_and_decreases():
    student = _student()
    teacher = NetworkDenoiser(_student(seed=1), "x")
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=True)
    enc = SemanticEncoder(EncoderConfig.default_for(8, 1, LATENT, norm_groups=4))
    params = list(enc.parameters()) + list(pred.trainable_parameters())
    # c_t = e¹⁰ at t = 1 (half of the K = 2 grid): every Adam step moves the shift by ~lr·c, so the learning
    # rate must be small (3e-3 diverges here; that is the §7 numerical note, not a bug in the loss).
    opt = torch.optim.Adam(params, lr=1e-5)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    student_before = {k: v.clone() for k, v in student.state_dict().items()}

    def loss_at(seed: int) -> torch.Tensor:
        return predictor_loss(encoder=enc, predictor=pred, teacher=teacher, parameterization="x", x0=x0,
                              num_steps=2, draws=GeneratorDraws(torch.Generator().manual_seed(seed), 16),
                              weighting="truncated_snr", shift_parameterization="x0_tweedie").mean()

    with torch.no_grad():
        first = sum(loss_at(s).item() for s in range(4))
    for step in range(60):
        opt.zero_grad()
        loss = loss_at(step % 4)
        loss.backward()
        assert all(p.grad is None for p in student.parameters())
        opt.step()
    with torch.no_grad():
        last = sum(loss_at(s).item() for s in range(4))
    assert last < 0.9 * first, (first, last)
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_before[k]), k


# ------------------------------------------------------------------------------------------ shift parameterisations (D15)


def _reference_coefficient(form: str, t: torch.Tensor) -> torch.Tensor:
    """c_t of each form from α, σ in float64 (module docstring of sferd.methods.sferd; sferd-method.md D15)."""
    alpha, sigma = alpha_sigma(logsnr(t.double()))
    return {"x0_tweedie": sigma**2 / alpha, "x0_direct": torch.ones_like(alpha), "v_direct": sigma}[form]


def test_the_forms_are_the_spec_s_forms():
    from typing import get_args

    from sferd.spec.models import PredictorSpec

    assert get_args(PredictorSpec.model_fields["shift_parameterization"].annotation) == SHIFT_PARAMETERIZATIONS
    assert SHIFT_PARAMETERIZATIONS[0] == "x0_tweedie"


@pytest.mark.parametrize("form", SHIFT_PARAMETERIZATIONS)
def test_shift_coefficient_of_each_form(form):
    t = torch.tensor([1.0, 0.875, 0.5, 0.25, 0.125, 0.01], dtype=torch.float64)
    got = shift_coefficient(logsnr(t), form)
    torch.testing.assert_close(got, _reference_coefficient(form, t), rtol=1e-12, atol=0)
    assert (got > 0).all()  # a positive fixed function of t: the forms span the same shifts (D15)
    if form != "x0_tweedie":
        assert got.max() <= 1.0  # well conditioned: no step moves the shift by more than G itself


def test_unknown_shift_form_is_refused():
    with pytest.raises(ValueError, match="x0_direct"):
        shift_coefficient(logsnr(torch.tensor([0.5])), "eps")
    student = _student()
    noise, z = _noise()
    with pytest.raises(ValueError, match="unknown shift parameterisation"):
        sample_sferd(predictor=GradientPredictor(student, latent_dim=LATENT), student=student, parameterization="x",
                     noise=noise, z=z, num_steps=1, cutoff_fraction=0.3, shift_parameterization="x0")


@pytest.mark.parametrize("form", SHIFT_PARAMETERIZATIONS)
def test_shifted_x0_of_each_form_matches_the_reference_formula(form):
    """x̂₀^S = x̂₀^θ + c_t·G with c_t written out independently; for x0_tweedie this pins the numbers the
    released form had before the parameterisation became a choice (σ²/α at the student's input time, D4)."""
    student = _student()
    pred = _perturbed_predictor(student)
    noise, z = _noise()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    x0_s, x0_theta = shifted_x0(pred, "x", noise, t, None, z, shift_parameterization=form)
    _, g = pred(noise, time_input(logsnr(t)), None, z)
    c = _reference_coefficient(form, t).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_s, x0_theta + c * g)
    if form == "x0_tweedie":
        assert c[0].item() == pytest.approx(math.exp(10.0), rel=1e-5)  # t = 1: the ill-conditioned case


@pytest.mark.parametrize("form", SHIFT_PARAMETERIZATIONS)
def test_predictor_loss_is_the_same_objective_for_every_form(form):
    """The loss is max(SNR, 1)·mean‖x̂₀^θ + c_t·G − x̃‖² whatever the form: only c_t changes, never the target or
    the weight (checked against the formula written out with the PD target and the draws replayed)."""
    from sferd.diffusion.losses import snr_weight
    from sferd.methods.pd import pd_target, sample_training_point

    student = _student()
    teacher = NetworkDenoiser(_student(seed=1), "x")
    pred = _perturbed_predictor(student)
    enc = SemanticEncoder(EncoderConfig.default_for(8, 1, LATENT, norm_groups=4))
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        got = predictor_loss(encoder=enc, predictor=pred, teacher=teacher, parameterization="x", x0=x0, num_steps=4,
                             draws=GeneratorDraws(torch.Generator().manual_seed(5), 8), weighting="truncated_snr",
                             shift_parameterization=form)
        i, t, x_t = sample_training_point(x0, 4, GeneratorDraws(torch.Generator().manual_seed(5), 8))
        target = pd_target(teacher, x_t, i, 4)
        student_out, g = pred(x_t, time_input(logsnr(t)), None, enc(x0))
        shifted = student_out + _reference_coefficient(form, t).float().view(-1, 1, 1, 1) * g
        expected = snr_weight("truncated_snr", logsnr(t)) * (shifted - target).pow(2).flatten(1).mean(1)
    assert got.shape == (8,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _structured_images(n: int, seed: int) -> torch.Tensor:
    """Smooth 8×8 images in [-1, 1] (random low-frequency mixtures): data with structure a predictor can use,
    and from which held-out images are new draws."""
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(n, 4, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * yy])  # 4 × 8 × 8
    return torch.tanh(torch.einsum("nk,khw->nhw", coeffs, basis))[:, None]


@pytest.mark.parametrize("form", ["x0_direct", "v_direct"])
def test_trained_well_conditioned_predictor_lowers_the_held_out_one_step_loss(form):
    """The 1-step student is the case issue 11 is about: at K = 1 (t = 1) the released form has c = e¹⁰ and barely
    learns. In a well-conditioned form a briefly trained G must lower the stage-(b) loss on held-out images and
    draws (never trained on) below G = 0, which is the frozen student itself."""
    student = _student()
    teacher = NetworkDenoiser(_student(seed=1), "x")  # another network: the student has a residual to correct
    torch.manual_seed(7)
    enc = SemanticEncoder(EncoderConfig.default_for(8, 1, LATENT, norm_groups=4))
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=True)
    train_x, held_x = _structured_images(256, seed=11), _structured_images(48, seed=12)

    def loss(x0, seed):
        return predictor_loss(encoder=enc, predictor=pred, teacher=teacher, parameterization="x", x0=x0, num_steps=1,
                              draws=GeneratorDraws(torch.Generator().manual_seed(seed), len(x0)),
                              weighting="truncated_snr", shift_parameterization=form).mean()

    def held_out():
        with torch.no_grad():
            return sum(loss(held_x, 10_000 + r).item() for r in range(4)) / 4

    before = held_out()
    # PDAE-sized steps. (The same 15 updates in x0_tweedie multiply this loss by ~10⁴: lr·e¹⁰ per step.)
    opt = torch.optim.Adam(list(enc.parameters()) + list(pred.trainable_parameters()), lr=1e-3)
    for step in range(15):
        opt.zero_grad()
        idx = torch.randint(0, len(train_x), (16,), generator=torch.Generator().manual_seed(step))
        loss(train_x[idx], step).backward()
        opt.step()
    after = held_out()
    assert after < 0.8 * before, (before, after)


def test_shifted_student_is_a_denoiser_of_the_sampler_family():
    """The shifted student plugs into any sampler of the family as a denoiser bound to z; on its own K-step grid
    it walks the grid, its x̂₀ and ε̂ describe x_t, and off that grid it refuses (the shift is a per-step rule)."""
    from sferd.diffusion.samplers import make_sampler
    from sferd.methods.sferd import ShiftedStudent

    student = _student()
    pred = _perturbed_predictor(student)
    noise, z = _noise()
    kwargs = dict(predictor=pred, student=student, parameterization="x", z=z, cutoff_fraction=0.3,
                  shift_parameterization="v_direct")
    den = ShiftedStudent(**kwargs, num_steps=4)
    steps_seen = []
    make_sampler("ddim", clip=True)(den, noise, 4, callback=lambda i, t, x: steps_seen.append(t))
    assert steps_seen == [0.75, 0.5, 0.25, 0.0]
    # x̂₀ and ε̂ are consistent: x_t = α x̂₀ + σ ε̂ on a shifted step
    t = torch.full((noise.shape[0],), 1.0)
    x0, eps = den(noise, t, None)
    a, s = alpha_sigma(logsnr(t))
    assert torch.allclose(a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps, noise, atol=1e-5)
    with pytest.raises(ValueError, match="4-step grid"):
        den(noise, torch.full((noise.shape[0],), 0.6), None)
