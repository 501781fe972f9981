"""The sampler family (sferd.diffusion.samplers) and gDDIM on VP (sferd.diffusion.gddim), against independent
references: `ddim_sample` itself, and the closed-form probability flow of Gaussian data (tests/gaussian_ref.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from gaussian_ref import _A, _B, TinyNet, exact_end, gaussian_denoiser, noise64
from sferd.diffusion.gddim import GDDIM, coefficients, integral_coefficients
from sferd.diffusion.sampler import ddim_sample
from sferd.diffusion.samplers import DDIM, EulerPF, make_sampler, sampler_names, time_grid


def test_time_grid_int_and_explicit():
    assert time_grid(4) == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert time_grid(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)) == (1.0, 0.5, 0.1)
    for bad in ([1.0], [0.5, 0.5], [0.2, 0.4], [1.5, 0.0], 0):
        with pytest.raises(ValueError):
            time_grid(bad)
    assert set(sampler_names()) >= {"ddim", "gddim", "euler_pf", "d_ddim", "gddim_cld"}


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_ddim_and_gddim_order0_equal_ddim_sample_bitwise(steps, clip):
    net = TinyNet()
    x1 = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    ref = ddim_sample(net, x1, steps, clip=clip)
    seen = []
    out = DDIM(clip=clip)(net, x1, steps, callback=lambda i, t, x: seen.append((i, t)))
    assert torch.equal(out, ref)
    assert seen == [(i, (steps - 1 - i) / steps) for i in range(steps)]
    assert torch.equal(GDDIM(order=0, clip=clip)(net, x1, steps), ref)
    assert torch.equal(make_sampler("ddim", clip=clip)(net, x1, time_grid(steps)), ref)


def test_quadrature_matches_adaptive_integration():
    # C_j = ∫ ℓ_j(t(ρ)) dρ by scipy's adaptive quad on t itself (dρ = a sec²(a t + b) dt), an independent route
    nodes, t, s = (0.5, 0.625, 0.75), 0.5, 0.375
    ours = integral_coefficients(nodes, t, s, data_end=False)
    for j in range(3):
        others = [n for m, n in enumerate(nodes) if m != j]

        def f(tau, j=j, others=others):
            l = np.prod([(tau - o) / (nodes[j] - o) for o in others])
            return l * _A / math.cos(_A * tau + _B) ** 2

        ref, _ = integrate.quad(f, t, s, epsabs=1e-14, epsrel=1e-13)
        assert ours[j] == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # the first step from t = 1 (the integrand peaks at ρ = e^{10}) and the data end (ρ → 0)
    first = integral_coefficients((0.875, 1.0), 0.875, 0.75, data_end=False)
    rho = lambda tt: math.tan(_A * tt + _B)  # noqa: E731
    assert first.sum() == pytest.approx(rho(0.75) - rho(0.875), rel=1e-12)
    end = integral_coefficients((0.125, 0.25), 0.125, 0.0, data_end=True)
    assert end.sum() == pytest.approx(-rho(0.125), rel=1e-12)


def gaussian_error(sampler, steps, x1):
    return (sampler(gaussian_denoiser, x1, steps) - exact_end(x1)).abs().max().item()


def test_gddim_orders_beat_ddim_and_converge_on_gaussian_data():
    x1 = noise64()
    errs = {q: [gaussian_error(GDDIM(order=q, clip=False), n, x1) for n in (8, 16, 32)] for q in range(4)}
    for q in (1, 2, 3):
        for k in range(3):
            assert errs[q][k] < errs[0][k], errs
    # convergence when the steps double: DDIM is first order (rate ≈ 1); order 1 is second order (rate ≈ 2). Orders
    # 2-3 are also ≈ 2 asymptotically, not 3-4: their warm-up steps (order min(q, k), the first one DDIM) have local
    # error O(h²), which bounds the global order; they win on the constant (smaller error at few steps).
    rate = {q: math.log2(errs[q][1] / errs[q][2]) for q in range(4)}
    assert 0.7 < rate[0] < 1.3, (rate, errs)
    for q in (1, 2, 3):
        assert rate[q] > 1.4, (rate, errs)
    assert errs[3][0] < errs[2][0] < errs[1][0], errs
    assert errs[2][2] < 1e-3 and errs[3][2] < 1e-3, errs


def test_euler_pf_converges_first_order_on_gaussian_data():
    x1 = noise64()
    e = [gaussian_error(EulerPF(clip=False), n, x1) for n in (16, 32, 64)]
    assert e[0] > e[1] > e[2]
    assert 0.7 < math.log2(e[1] / e[2]) < 1.5, e


def test_gddim_checks_order_against_steps_and_caches():
    with pytest.raises(ValueError, match="order 3"):
        GDDIM(order=3)(gaussian_denoiser, noise64(2), 3)
    with pytest.raises(ValueError):
        GDDIM(order=-1)
    assert coefficients(time_grid(6), 2) is coefficients(time_grid(6), 2)


def test_schedule_calculus_inverse_and_derivative():
    from sferd.diffusion.schedule import logsnr
    from sferd.diffusion.schedule_calculus import dlogsnr_dt, time_from_logsnr

    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(time_from_logsnr(logsnr(t)), t, rtol=0, atol=1e-12)
    # λ' against central differences of the independent closed form λ = −2 log tan(a t + b)
    lam = lambda tt: -2 * np.log(np.tan(_A * tt + _B))  # noqa: E731
    for tv in (0.01, 0.3, 0.5, 0.9, 0.99):
        h = 1e-6
        assert float(dlogsnr_dt(torch.tensor(tv, dtype=torch.float64))) == pytest.approx(
            (lam(tv + h) - lam(tv - h)) / (2 * h), rel=1e-7)
