"""Schedule, parameterizations, DDIM and the exact PD target, against closed-form references."""

import math

import numpy as np
import pytest
import torch

from sferd.diffusion.losses import snr_weight, weighted_x_mse
from sferd.diffusion.parameterization import clip_x0, to_x0_eps, v_target
from sferd.diffusion.sampler import ddim_sample, ddim_step, per_sample_noise, to_uint8
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, sigma_ratio, time_input
from sferd.methods.draws import GeneratorDraws
from sferd.methods.pd import pd_loss, pd_target


class GaussianDenoiser:
    """Exact E[x0 | x_t] for x0 ~ N(mu, s² I): the PD target must be exact for it (no learning involved)."""

    def __init__(self, mu: float, s: float):
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, x_t, t, y=None):
        self.calls += 1
        a, sg = alpha_sigma(logsnr(t.double()).double())
        a, sg = broadcast(a, x_t), broadcast(sg, x_t)
        gain = a * self.s**2 / (a**2 * self.s**2 + sg**2)
        x0 = self.mu + gain * (x_t - a * self.mu)
        return x0, (x_t - a * x0) / sg


def test_schedule_endpoints_and_midpoint():
    lam = logsnr(torch.tensor([0.0, 0.5, 1.0]))
    assert lam[0].item() == pytest.approx(20.0, abs=1e-4)
    assert lam[1].item() == pytest.approx(0.0, abs=1e-5)
    assert lam[2].item() == pytest.approx(-20.0, abs=1e-4)
    a, s = alpha_sigma(lam)
    assert a[1].item() == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert s[0].item() == pytest.approx(4.54e-5, rel=1e-2)
    assert a[2].item() == pytest.approx(4.54e-5, rel=1e-2)
    assert torch.allclose(a**2 + s**2, torch.ones(3))


def test_schedule_monotone_and_time_input():
    t = torch.linspace(0, 1, 101)
    lam = logsnr(t)
    assert torch.all(lam[1:] < lam[:-1])
    u = time_input(lam)
    assert torch.allclose(u, u.clamp(0, 1))
    assert torch.all(u[1:] > u[:-1])


def test_sigma_ratio_matches_direct():
    lam_s, lam_t = torch.tensor([3.0, -1.0, 10.0]), torch.tensor([1.0, -4.0, 2.0])
    _, s_s = alpha_sigma(lam_s)
    _, s_t = alpha_sigma(lam_t)
    assert torch.allclose(sigma_ratio(lam_s, lam_t), s_s / s_t, rtol=1e-6)


@pytest.mark.parametrize("kind", ["x", "eps", "v", "both"])
def test_parameterization_identity(kind):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    lam = torch.tensor([-6.0, -1.0, 0.5, 5.0], dtype=torch.float64)
    a, s = (broadcast(v, x_t) for v in alpha_sigma(lam))
    out = torch.randn(4, 4 if kind == "both" else 2, 3, 3, generator=g, dtype=torch.float64)
    x0, eps = to_x0_eps(kind, out, x_t, a, s)
    assert torch.allclose(a * x0 + s * eps, x_t, atol=1e-10)


def test_parameterization_round_trip_from_truth():
    """Feeding each kind its true target recovers the true (x0, eps)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    lam = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    a, s = (broadcast(v, x0) for v in alpha_sigma(lam))
    x_t = a * x0 + s * eps
    for kind, out in [("x", x0), ("eps", eps), ("v", v_target(x0, eps, a, s)), ("both", torch.cat([x0, eps], 1))]:
        got_x0, got_eps = to_x0_eps(kind, out, x_t, a, s)
        assert torch.allclose(got_x0, x0, atol=1e-10), kind
        assert torch.allclose(got_eps, eps, atol=1e-10), kind
    with pytest.raises(ValueError):
        to_x0_eps("nope", x0, x_t, a, s)


def test_clip_keeps_identity():
    x_t = torch.randn(2, 1, 3, 3) * 3
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    x0, eps = clip_x0(x_t * 2, x_t, a, s)
    assert x0.abs().max() <= 1
    assert torch.allclose(a * x0 + s * eps, x_t, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_pd_target_one_student_step_lands_on_two_teacher_steps(n):
    teacher = GaussianDenoiser(mu=0.3, s=0.5)
    g = torch.Generator().manual_seed(n)
    x0 = (0.3 + 0.5 * torch.randn(n * 3, 1, 4, 4, generator=g)).double()
    i = torch.arange(1, n + 1).repeat(3)
    t = i.double() / n
    a, s = alpha_sigma(logsnr(t).double())
    x_t = broadcast(a, x0) * x0 + broadcast(s, x0) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_tilde = pd_target(teacher, x_t, i, n)
    assert teacher.calls == 2

    # independent reference: two teacher DDIM steps t → t - 1/(2n) → t - 1/n
    t_mid, t_end = t - 0.5 / n, t - 1.0 / n
    x0_1, _ = teacher(x_t, t)
    z_mid = ddim_step(x_t, x0_1, t, t_mid)
    x0_2, _ = teacher(z_mid, t_mid)
    z_end = ddim_step(z_mid, x0_2, t_mid, t_end)

    final = i == 1
    student_lands = ddim_step(x_t, x_tilde, t, t_end)
    assert torch.allclose(student_lands[~final], z_end[~final], rtol=1e-4, atol=1e-4)
    # final interval: the target is the teacher's x̂₀ of the second sub-step (PD's rule)
    assert torch.allclose(x_tilde[final], x0_2[final], atol=1e-6)


def test_pd_target_is_not_the_teacher_prediction():
    """Guard against a simplified target: away from the final interval x̃ differs from x̂₀(x_t)."""
    teacher = GaussianDenoiser(mu=0.0, s=0.5)
    x_t = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    i = torch.full((8,), 3)
    x_tilde = pd_target(teacher, x_t, i, 4)
    x0_direct, _ = teacher(x_t, i.double() / 4)
    assert not torch.allclose(x_tilde, x0_direct, atol=1e-3)


def test_pd_loss_zero_for_perfect_student_of_gaussian_teacher_at_n1():
    """With N = 1 the target is the teacher's x̂₀ at t = 1/2 from z'; a student returning it has zero loss."""
    teacher = GaussianDenoiser(mu=0.0, s=0.5)

    class Oracle:
        def __call__(self, x_t, t, y=None):
            return pd_target(teacher, x_t, torch.ones(x_t.shape[0], dtype=torch.long), 1), None

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4)
    loss = pd_loss(Oracle(), teacher, x0, 1, GeneratorDraws(g, 4))
    assert loss.shape == (4,) and float(loss.abs().max()) == pytest.approx(0.0, abs=1e-10)


def test_loss_weights():
    lam = torch.tensor([-2.0, 0.0, 2.0])
    assert torch.allclose(snr_weight("truncated_snr", lam), torch.tensor([1.0, 1.0, math.exp(2.0)]))
    assert torch.allclose(snr_weight("snr_plus_one", lam), 1 + torch.exp(lam))
    pred, tgt = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    per_sample = weighted_x_mse(pred, tgt, lam, "truncated_snr")
    assert per_sample.tolist() == pytest.approx([1.0, 1.0, math.exp(2)], rel=1e-6)


def test_ddim_matches_exact_flow_for_gaussian_data():
    """The probability-flow ODE maps x_1 to mu + s·x_1 for Gaussian data; many DDIM steps approach it."""
    mu, s = 0.2, 0.4
    teacher = GaussianDenoiser(mu, s)
    noise = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    exact = mu + s * noise
    err_256 = (ddim_sample(teacher, noise, 256, clip=False) - exact).abs().max().item()
    err_1024 = (ddim_sample(teacher, noise, 1024, clip=False) - exact).abs().max().item()
    assert err_256 < 0.02
    assert err_1024 < err_256 / 3  # first-order convergence to the exact flow
    one = ddim_sample(teacher, noise, 1, clip=False)
    assert torch.allclose(one, torch.full_like(one, mu), atol=1e-3)  # x̂₀ at t = 1 is the data mean


def test_ddim_deterministic_and_clipped():
    teacher = GaussianDenoiser(0.0, 3.0)
    noise = per_sample_noise([5, 6, 7], (1, 4, 4))
    a = ddim_sample(teacher, noise, 4)
    b = ddim_sample(teacher, noise.clone(), 4)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0


def test_per_sample_noise_independent_of_batching():
    whole = per_sample_noise(list(range(10)), (1, 3, 3))
    parts = torch.cat([per_sample_noise([0, 1, 2], (1, 3, 3)), per_sample_noise(list(range(3, 10)), (1, 3, 3))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])


def test_to_uint8_quantisation():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).reshape(-1).tolist() == [0, 64, 128, 255, 255]


def _np_schedule(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(α, σ) of the clipped cosine logSNR schedule (sferd-method.md §1), in numpy float64, written out again here
    so the reference shares no code with sferd.diffusion.schedule."""
    b = math.atan(math.exp(-0.5 * 20.0))
    a = math.atan(math.exp(-0.5 * -20.0)) - b
    lam = -2.0 * np.log(np.tan(a * t + b))
    return np.sqrt(1.0 / (1.0 + np.exp(-lam))), np.sqrt(1.0 / (1.0 + np.exp(lam)))


def _np_pd_target(x_t: np.ndarray, i: np.ndarray, n: int, mu: float, s: float) -> np.ndarray:
    """The §5 PD target of the exact Gaussian teacher, x0 ~ N(mu, s²), in numpy float64."""

    def teacher(x, t):
        a, sg = (v[:, None, None, None] for v in _np_schedule(t))
        x0 = mu + a * s**2 / (a**2 * s**2 + sg**2) * (x - a * mu)
        return x0, (x - a * x0) / sg

    def coef(t):
        return tuple(v[:, None, None, None] for v in _np_schedule(t))

    t = i / n
    t_mid, t_end = t - 0.5 / n, t - 1.0 / n
    (a_t, s_t), (a_mid, s_mid), (a_end, s_end) = coef(t), coef(t_mid), coef(t_end)
    x0_1, eps_1 = teacher(x_t, t)
    z_mid = a_mid * x0_1 + s_mid * eps_1
    x0_2, eps_2 = teacher(z_mid, t_mid)
    z_end = a_end * x0_2 + s_end * eps_2
    final = (i == 1)[:, None, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # i = 1 divides by ~0; the final-interval rule replaces it
        r = s_end / s_t
        x_tilde = (z_end - r * x_t) / (a_end - r * a_t)
    return np.where(final, x0_2, x_tilde)


def test_pd_target_at_n4096_matches_a_float64_reference():
    """Table 1's first halving has N = 4096: x̃ divides by α_{t″} − r·α_t = O(1/N), so coefficient rounding is
    amplified ~N times. In float32 the schedule alone put errors of up to ~7.5e-4 into x̃ (issue 11 §4); with the
    coefficients in float64 the target matches an independent numpy float64 computation to 1e-5."""
    n, mu, s = 4096, 0.3, 0.5
    teacher = GaussianDenoiser(mu=mu, s=s)
    i = torch.tensor([1, 2, 3, 17, 100, 1000, 2048, 3000, 3900, 4000, 4095, 4096])
    g = torch.Generator().manual_seed(4096)
    x0 = mu + s * torch.randn(len(i), 1, 4, 4, generator=g, dtype=torch.float64)
    a, sg = _np_schedule(i.numpy() / n)
    x_t = (torch.from_numpy(a)[:, None, None, None] * x0
           + torch.from_numpy(sg)[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64))
    expected = _np_pd_target(x_t.numpy(), i.numpy(), n, mu, s)
    got = pd_target(teacher, x_t, i, n)
    assert got.dtype == torch.float64
    err = np.abs(got.numpy() - expected).max()
    assert err < 1e-5, err
