"""CLD process maths and gDDIM on CLD (sferd.diffusion.cld) against references written here from the SDE alone:
the matrix exponential, Runge–Kutta integration of the moment ODEs, and the exact probability flow of Gaussian data
integrated numerically (a general-purpose ODE solver, not the exponential integrator under test).

CLD, gDDIM's CIFAR-10 values (baselines.md §6): M⁻¹ = 4, β = 4, γ = 0.04, critical damping Γ = 2/√M⁻¹ = 1;
du = F u dt + G dw, F = β [[0, M⁻¹], [−1, −Γ M⁻¹]], G Gᵀ = diag(0, 2Γβ), v₀ ~ N(0, γ/M⁻¹).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from sferd.diffusion.cld import CLD, CLDGDDIM
from sferd.diffusion.samplers import make_sampler

M_INV, BETA, GAMMA, T_MIN = 4.0, 4.0, 0.04, 1e-3
F = BETA * np.array([[0.0, M_INV], [-1.0, -1.0 * M_INV]])
GG = np.diag([0.0, 2.0 * 1.0 * BETA])
SIGMA0 = np.diag([0.0, GAMMA / M_INV])


@pytest.fixture(scope="module")
def cld():
    return CLD(t_min=T_MIN, m_inv=M_INV, beta=BETA, gamma=GAMMA)


def moments(cov0, mean0, t_end=1.0):
    """Dense solution of dμ/dt = F μ, dS/dt = F S + S Fᵀ + G Gᵀ from t = 0 (scipy DOP853, tight tolerances)."""
    def rhs(t, y):
        mu, s = y[:2], y[2:].reshape(2, 2)
        return np.concatenate([F @ mu, (F @ s + s @ F.T + GG).reshape(-1)])
    sol = solve_ivp(rhs, (0.0, t_end), np.concatenate([mean0, cov0.reshape(-1)]), method="DOP853", rtol=1e-12,
                    atol=1e-15, dense_output=True)
    return lambda t: (sol.sol(t)[:2], sol.sol(t)[2:].reshape(2, 2))


def test_transition_is_the_matrix_exponential(cld):
    for t, s in ((1.0, 0.0), (0.7, 0.2), (0.01, 0.0), (0.5, 0.5)):
        ref = torch.linalg.matrix_exp(torch.from_numpy(F * (t - s))).numpy()
        np.testing.assert_allclose(cld.psi(t, s), ref, rtol=1e-12, atol=1e-14)
    assert cld.damping == 1.0


def test_covariance_solves_the_moment_ode(cld):
    ref = moments(SIGMA0, np.zeros(2))
    for t in (T_MIN, 0.01, 0.1, 0.5, 1.0):
        _, s_ref = ref(t)
        np.testing.assert_allclose(cld.sigma(t), s_ref, rtol=1e-9, atol=1e-12)
        # and Van Loan's block exponential
        e = expm(np.block([[F, GG], [np.zeros((2, 2)), -F.T]]) * t)
        p = expm(F * t)
        np.testing.assert_allclose(cld.sigma(t), p @ SIGMA0 @ p.T + e[:2, 2:] @ e[:2, :2].T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.linalg.cholesky(cld.sigma(0.3)), cld.cholesky(0.3))


def test_R_is_a_square_root_of_sigma_and_solves_its_ode(cld):
    for t in (T_MIN, 0.004, 0.05, 0.3, 0.8, 1.0):
        r = cld.R(t)
        np.testing.assert_allclose(r @ r.T, cld.sigma(t), rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(cld.R(1.0), np.linalg.cholesky(cld.sigma(1.0)), atol=1e-14)
    for t in (0.01, 0.2, 0.6):  # dR/dt = (F + ½ G Gᵀ Σ⁻¹) R by central differences
        h = 1e-5
        fd = (cld.R(t + h) - cld.R(t - h)) / (2 * h)
        np.testing.assert_allclose(fd, (F + 0.5 * GG @ np.linalg.inv(cld.sigma(t))) @ cld.R(t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        cld.R(T_MIN / 2)


def test_quadrature_sums_to_the_closed_form_order0_coefficient(cld):
    # Σ_j C_j = ∫ Ψ(s,τ) ½GGᵀ R_τ⁻ᵀ dτ = R_s − Ψ(s,t) R_t: quadrature vs the R ODE's identity
    for nodes, t, s in (((0.5, 0.6, 0.7), 0.5, 0.4), ((0.02, 0.05), 0.02, T_MIN), ((1.0,), 1.0, 0.81)):
        c = cld.integral_coefficients(nodes, t, s)
        np.testing.assert_allclose(c.sum(0), cld.R(s) - cld.psi(s, t) @ cld.R(t), rtol=1e-7, atol=1e-9)


class GaussianCLD:
    """Exact ε̂ of the augmented state for data x₀ ~ N(m, s²): E[ε | u] = R_tᵀ S_t⁻¹ (u − μ_t), with μ_t, S_t the
    marginal moments (from `moments`, not from the code under test) and R_t the parameterisation being sampled."""

    def __init__(self, cld, m, s):
        self.cld, self.m = cld, m
        self.mom = moments(np.diag([s**2, GAMMA / M_INV]), np.array([m, 0.0]))

    def __call__(self, u, t, y=None):
        tv = float(t[0])
        mu, cov = self.mom(tv)
        a = self.cld.R(tv).T @ np.linalg.inv(cov)
        return torch.einsum("ij,bj...->bi...", torch.from_numpy(a), u - torch.from_numpy(mu).reshape(1, 2, 1))

    def exact_flow(self, u1):
        """u(t_min) of the exact probability flow du/dt = F u + ½ G Gᵀ S_t⁻¹ (u − μ_t) from u(1) = u1; linear, so
        u − μ maps through the fundamental matrix Φ' = (F + ½GGᵀS⁻¹)Φ, Φ(1) = I, integrated by DOP853."""
        def rhs(t, phi):
            cov = self.mom(t)[1]
            return ((F + 0.5 * GG @ np.linalg.inv(cov)) @ phi.reshape(2, 2)).reshape(-1)
        phi = solve_ivp(rhs, (1.0, T_MIN), np.eye(2).reshape(-1), method="DOP853", rtol=1e-12,
                        atol=1e-14).y[:, -1].reshape(2, 2)
        mu1, mu0 = (torch.from_numpy(self.mom(t)[0]).reshape(1, 2, 1) for t in (1.0, T_MIN))
        return mu0 + torch.einsum("ij,bj...->bi...", torch.from_numpy(phi), u1 - mu1)


def start(cld, n=64, seed=0):
    xi = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return xi, torch.einsum("ij,bj...->bi...", torch.from_numpy(cld.R(1.0)), xi)


def test_order0_is_exact_for_point_mass_data(cld):
    # with s = 0 the exact ε is constant along the flow: that is what R_t was chosen for
    model = GaussianCLD(cld, 0.4, 0.0)
    xi, u1 = start(cld)
    out = CLDGDDIM(process=cld, order=0).sample_state(model, xi, 3)
    ref = model.exact_flow(u1)
    assert (out - ref).abs().max().item() < 1e-6


def test_gddim_on_cld_converges_to_the_exact_flow(cld):
    model = GaussianCLD(cld, 0.3, 0.5)
    xi, u1 = start(cld)
    ref = model.exact_flow(u1)
    err = {q: [(CLDGDDIM(process=cld, order=q).sample_state(model, xi, n) - ref).abs().max().item()
               for n in (10, 20, 40)] for q in (0, 1, 2)}
    for q in (0, 1, 2):
        assert err[q][0] > err[q][1] > err[q][2], err
    # Off a point mass, ε = R_tᵀ S_t⁻¹ (u − μ_t) varies on the scale of t near t_min (R_t → 0 there while the
    # marginal S_t does not), so the errors are large at few steps; what the orders buy shows as the steps grow
    # (measured max errors at 40 steps: 0.25, 0.088, 0.029 for orders 0, 1, 2; 0.068, 0.0068, 0.0006 at 160).
    assert err[1][2] < err[0][2] / 2 and err[2][2] < err[1][2] / 2, err
    assert err[2][2] < 0.05, err
    # the x component's spread at t_min matches the data's (the endpoint marginal), from 64×3 samples
    x = make_sampler("gddim_cld", process=cld, order=2)(model, xi, 20)
    assert x.shape == (64, 3)


def test_sampler_validates(cld):
    xi, _ = start(cld, n=2)
    with pytest.raises(ValueError, match="order 3"):
        CLDGDDIM(process=cld, order=3)(GaussianCLD(cld, 0.0, 0.5), xi, 3)
    with pytest.raises(ValueError):
        CLDGDDIM(process=cld)(GaussianCLD(cld, 0.0, 0.5), xi[:, :1], 3)
    with pytest.raises(ValueError):
        CLD(t_min=0.0)


# -- plain Euler on the CLD probability flow (sferd.diffusion.cld.CLDEuler) ---------------------------------------


def euler_reference(model, u1, grid):
    """Euler written from the probability flow of the exact Gaussian model, du/dt = F u + ½ G Gᵀ S_t⁻¹ (u − μ_t): the
    score −S_t⁻¹(u − μ_t) comes from the moment ODE, so neither R_t nor the code under test enters."""
    u = u1.clone()
    for t, s in zip(grid, grid[1:]):
        mu, cov = model.mom(t)
        drift = torch.einsum("ij,bj...->bi...", torch.from_numpy(F), u) + torch.einsum(
            "ij,bj...->bi...", torch.from_numpy(0.5 * GG @ np.linalg.inv(cov)), u - torch.from_numpy(mu).reshape(1, 2, 1))
        u = u + (s - t) * drift
    return u


def test_euler_is_plain_euler_on_the_probability_flow(cld):
    model = GaussianCLD(cld, 0.3, 0.5)
    xi, u1 = start(cld)
    for steps in (3, 10):
        grid = [T_MIN + (1 - T_MIN) * (i / steps) ** 2 for i in range(steps, -1, -1)]  # the quadratic grid
        out = make_sampler("euler_cld", process=cld).sample_state(model, xi, steps)
        np.testing.assert_allclose(out.numpy(), euler_reference(model, u1, grid).numpy(), rtol=1e-8, atol=1e-9)
    seen = []
    x = make_sampler("euler_cld", process=cld)(model, xi, 4, callback=lambda i, t, u: seen.append((i, t)))
    assert x.shape == (64, 3) and [i for i, _ in seen] == [0, 1, 2, 3] and seen[-1][1] == pytest.approx(T_MIN)


def test_euler_converges_at_first_order_and_gddim_beats_it_at_equal_nfe(cld):
    model = GaussianCLD(cld, 0.3, 0.5)
    xi, u1 = start(cld)
    ref = model.exact_flow(u1)
    euler = make_sampler("euler_cld", process=cld)
    err = [(euler.sample_state(model, xi, n) - ref).abs().max().item() for n in (200, 400, 800)]
    rates = [math.log2(a / b) for a, b in zip(err, err[1:])]
    assert all(0.8 < r < 1.3 for r in rates), (err, rates)  # first order
    gd = (CLDGDDIM(process=cld, order=2).sample_state(model, xi, 40) - ref).abs().max().item()
    e40 = (euler.sample_state(model, xi, 40) - ref).abs().max().item()
    assert gd < e40 / 3, (gd, e40)


# -- the CLD teacher's loss (sferd.methods.cld_teacher) ----------------------------------------------------------


def test_cld_training_loss_equals_an_independent_formula():
    """u_t = e^{Ft}(x₀, 0) + R_t ε with R_t from its own ODE integrated here (scipy, from Σ by Van Loan's block
    exponential), loss = mean over the 2·C·H·W entries of (ε_θ(u_t, t) − ε)², with the same draws."""
    from sferd.methods.cld_teacher import cld_teacher_loss
    from sferd.methods.draws import GeneratorDraws

    proc = CLD(t_min=T_MIN, m_inv=M_INV, beta=BETA, gamma=GAMMA)

    def sigma(t):
        e = expm(np.block([[F, GG], [np.zeros((2, 2)), -F.T]]) * t)
        p = expm(F * t)
        return p @ SIGMA0 @ p.T + e[:2, 2:] @ e[:2, :2].T

    r_sol = solve_ivp(lambda t, r: ((F + 0.5 * GG @ np.linalg.inv(sigma(t))) @ r.reshape(2, 2)).reshape(-1),
                      (1.0, T_MIN), np.linalg.cholesky(sigma(1.0)).reshape(-1), method="DOP853", rtol=1e-12,
                      atol=1e-14, dense_output=True)

    class Net(torch.nn.Module):  # a fixed nonlinear ε-model on 2C = 4 channels, using t and y
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(5)
            self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g))

        def forward(self, u, t, y):
            return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, u) * (1 + t[:, None, None, None])) + y[:, None, None, None]

    x0 = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(5.0)
    net = Net()
    for mixed in (False, True):
        got = cld_teacher_loss(net, proc, x0, GeneratorDraws(torch.Generator().manual_seed(9), 5), y=y, mixed=mixed)
        np.testing.assert_allclose(got.detach().numpy(), _reference_loss(net, x0, y, sigma, r_sol, mixed), rtol=1e-5)
        assert got.shape == (5,) and got.requires_grad  # per-sample, differentiable in the network


def _reference_loss(net, x0, y, sigma, r_sol, mixed):
    """The loss of the test above, written from the formulas; with `mixed`, ε̂ = R_tᵀ S_t⁻¹ u + net with
    S_t = Σ_t + e^{Ft} diag(1, 0) e^{Ftᵀ} (the covariance of u_t for N(0, I) data)."""

    g = torch.Generator().manual_seed(9)  # the same draws: t first, then ε on both halves
    t = T_MIN + (1 - T_MIN) * torch.rand(5, generator=g).double()
    eps = torch.randn(5, 2, 2, 3, 3, generator=g)
    want = []
    for b in range(5):
        tb = float(t[b])
        m = expm(F * tb)[:, 0]  # e^{Ft}(x₀, 0) = x₀ times the first column
        r = r_sol.sol(tb).reshape(2, 2)
        u = (torch.from_numpy(m).reshape(2, 1, 1, 1) * x0[b].double()
             + torch.einsum("ij,j...->i...", torch.from_numpy(r), eps[b].double())).float()
        pred = net(u.reshape(1, 4, 3, 3), t[b:b + 1].float(), y[b:b + 1]).detach().reshape(2, 2, 3, 3)
        if mixed:
            e = expm(F * tb)
            a = r.T @ np.linalg.inv(sigma(tb) + e @ np.diag([1.0, 0.0]) @ e.T)
            pred = pred + torch.einsum("ij,j...->i...", torch.from_numpy(a).float(), u)
        want.append(float(((pred - eps[b]) ** 2).mean()))
    return want


def test_mixed_part_is_the_exact_eps_of_unit_gaussian_data(cld):
    """A_t u = E[ε | u] for data N(0, I): checked against GaussianCLD (moments from the SDE's moment ODE)."""
    from sferd.methods.cld_teacher import EpsModel, mixed_matrices

    model = GaussianCLD(cld, 0.0, 1.0)
    u = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for tv in (T_MIN, 0.05, 0.5, 1.0):
        t = torch.full((4,), tv, dtype=torch.float64)
        a = torch.from_numpy(mixed_matrices(cld, t))
        np.testing.assert_allclose(torch.einsum("bij,bj...->bi...", a, u).numpy(), model(u, t).numpy(),
                                   rtol=1e-7, atol=1e-9)

    class Zero(torch.nn.Module):  # a network whose output is 0: the mixed model is then the Gaussian one
        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    u5 = torch.randn(3, 2, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.2, 0.2, 0.7], dtype=torch.float64)
    got = EpsModel(Zero(), process=cld, mixed=True)(u5, t)
    want = torch.stack([model(u5[b].reshape(1, 2, 4), t[b:b + 1]).reshape(2, 1, 2, 2) for b in range(3)])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-7, atol=1e-9)
    assert torch.equal(EpsModel(Zero())(u5, t), torch.zeros_like(u5))


def test_order3_on_gaussian_data_beats_order2_as_steps_grow(cld):
    # the CLD rows' q = 3 against the exact flow (measured max errors at 16/32/64 steps: q=2 0.245/0.068/0.015,
    # q=3 0.177/0.048/0.0076); with a trained network it can still lose, as extrapolation amplifies model error
    model = GaussianCLD(cld, 0.3, 0.5)
    xi, u1 = start(cld)
    ref = model.exact_flow(u1)
    err = {q: [(CLDGDDIM(process=cld, order=q).sample_state(model, xi, n) - ref).abs().max().item() for n in (32, 64)]
           for q in (2, 3)}
    assert err[3][0] < err[2][0] and err[3][1] < 0.7 * err[2][1] and err[3][1] < err[3][0] / 4, err


def test_cld_training_time_never_falls_below_t_min_in_the_networks_dtype():
    """A draw U = 0 gives t = t_min, and float32(0.01) < 0.01: the loss must use the next float32 up (the same t for
    the perturbation, the matrices and the network), not fail in CLD.R, which refuses times below t_min."""
    from sferd.methods.cld_teacher import cld_teacher_loss

    assert float(torch.tensor(0.01, dtype=torch.float32)) < 0.01  # the case this test is about
    proc = CLD(t_min=0.01, m_inv=M_INV, beta=BETA, gamma=GAMMA)
    seen = []

    class ZeroDraws:  # U = 0 for every sample, fixed ε
        def rand(self):
            return torch.zeros(3)

        def randn(self, *shape):
            return torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, u, t, y):
            seen.append(t.clone())
            return u * self.w

    for mixed in (False, True):
        loss = cld_teacher_loss(Net(), proc, torch.zeros(3, 1, 2, 2), ZeroDraws(), mixed=mixed)
        assert torch.isfinite(loss).all()
    assert all(float(v) >= 0.01 and v.dtype == torch.float32 for t in seen for v in t)
