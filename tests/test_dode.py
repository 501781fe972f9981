"""D-ODE calibration (sferd.diffusion.dode) on the analytic Gaussian teacher of tests/gaussian_ref.py.

The references are independent of the fit: the exact probability-flow end of Gaussian data (closed form, written in
gaussian_ref.py) and, for the least-squares solution, numpy's lstsq on the explicit one-column design.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from gaussian_ref import TinyNet, ab, exact_end, gaussian_denoiser, noise64
from sferd.diffusion.dode import (DDIMBase, DODESampler, GDDIMBase, calibrate, fit_lambdas, teacher_grid,
                                 teacher_targets)
from sferd.diffusion.gddim import GDDIM
from sferd.diffusion.samplers import DDIM, make_sampler, time_grid


def test_teacher_grid_contains_student_grid():
    assert teacher_grid(4, 3)[::3] == time_grid(4)
    g = teacher_grid([1.0, 0.5, 0.0], 2)
    assert g == (1.0, 0.75, 0.5, 0.25, 0.0)
    with pytest.raises(ValueError):
        teacher_grid(4, 0)


@pytest.mark.parametrize("denoise,clip", [(gaussian_denoiser, False), (TinyNet(), True)])
def test_k1_gives_zero_lambdas_and_plain_ddim(denoise, clip):
    x1 = noise64(32).float()
    cal = calibrate(DDIMBase(clip=clip), denoise, x1, 6, factor=1)
    assert cal.lambdas == (0.0,) * 6
    out = DODESampler(lambdas=cal.lambdas, clip=clip)(denoise, x1, 6)
    assert torch.equal(out, DDIM(clip=clip)(denoise, x1, 6))


def test_correction_reduces_error_on_gaussian_teacher():
    base = DDIMBase(clip=False)
    cal = calibrate(base, gaussian_denoiser, noise64(128, seed=1), 4, factor=10)
    assert any(abs(v) > 1e-3 for v in cal.lambdas), cal.lambdas
    record = json.loads(json.dumps(cal.as_dict()))
    assert record["lambdas"] == list(cal.lambdas) and record["factor"] == 10 and record["base"] == "ddim"
    assert record["grid"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    x_eval = noise64(256, seed=2)  # fresh noise: the λ's generalise, they are not fitted to these samples
    teacher_end = teacher_targets(base, gaussian_denoiser, x_eval, 4, factor=10)[-1]
    plain = DDIM(clip=False)(gaussian_denoiser, x_eval, 4)
    corrected = make_sampler("d_ddim", lambdas=cal.lambdas, clip=False)(gaussian_denoiser, x_eval, 4)
    err = lambda a, b: (a - b).pow(2).mean().sqrt().item()  # noqa: E731
    assert err(corrected, teacher_end) < 0.5 * err(plain, teacher_end)
    assert err(corrected, exact_end(x_eval)) <= err(plain, exact_end(x_eval))


BASES = [DDIMBase(clip=False), GDDIMBase(order=2, clip=False)]


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_each_lambda_is_the_least_squares_solution(base):
    # replay the greedy fit step by step and solve each 1-D problem with numpy's lstsq
    x1 = noise64(64, seed=3)
    cal = calibrate(base, gaussian_denoiser, x1, 3, factor=4)
    targets = teacher_targets(base, gaussian_denoiser, x1, 3, factor=4)
    grid, x, history = time_grid(3), x1, []
    plan = base.plan(grid)
    for i, tv in enumerate(grid[:-1]):
        x0, eps = base.predict(gaussian_denoiser, x, tv, None)
        nxt = base.step(plan, i, x, x0, eps, history)
        d = (base.coefficient(plan, i) * (eps - (history[0] if history else x))).numpy().reshape(-1, 1)
        r = (targets[i] - nxt).numpy().reshape(-1)
        lam = np.linalg.lstsq(d, r, rcond=None)[0][0]
        assert cal.lambdas[i] == pytest.approx(lam, rel=1e-10, abs=1e-14)
        x, history = nxt + cal.lambdas[i] * torch.from_numpy(d.reshape(x.shape)), [eps] + history[:1]


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_coefficient_is_the_derivative_of_the_step(base):
    # x_s(ε̂ + δ) − x_s(ε̂) = c δ at fixed x_t, with x̂₀ = (x_t − σ_t ε̂)/α_t re-derived (float64, α, σ of
    # gaussian_ref's independent schedule)
    grid = time_grid(4)
    plan = base.plan(grid)
    x = noise64(8, seed=5)
    history = [torch.randn_like(x), torch.randn_like(x)]
    for k in (1, 2, 3):  # an interior step with history, and the last step to the data end
        a, s_ = (float(v) for v in ab(grid[k]))
        eps = torch.randn_like(x)
        delta = 1e-3 * torch.randn_like(x)
        step = lambda e: base.step(plan, k, x, (x - s_ * e) / a, e, history)  # noqa: E731
        np.testing.assert_allclose((step(eps + delta) - step(eps)).numpy(), (base.coefficient(plan, k) * delta).numpy(),
                                   rtol=1e-8, atol=1e-12)


def test_d_gddim_k1_and_correction_on_gaussian_teacher():
    base = GDDIMBase(order=2, clip=False)
    x1 = noise64(64, seed=6)
    assert calibrate(base, gaussian_denoiser, x1, 5, factor=1).lambdas == (0.0,) * 5
    assert torch.equal(make_sampler("d_gddim", lambdas=[0.0] * 5, order=2, clip=False)(gaussian_denoiser, x1, 5),
                       GDDIM(order=2, clip=False)(gaussian_denoiser, x1, 5))
    cal = calibrate(base, gaussian_denoiser, x1, 4, factor=10)
    x_eval = noise64(256, seed=7)
    teacher_end = teacher_targets(base, gaussian_denoiser, x_eval, 4, factor=10)[-1]
    plain = GDDIM(order=2, clip=False)(gaussian_denoiser, x_eval, 4)
    corrected = make_sampler("d_gddim", lambdas=cal.lambdas, order=2, clip=False)(gaussian_denoiser, x_eval, 4)
    err = lambda a, b: (a - b).pow(2).mean().sqrt().item()  # noqa: E731
    assert err(corrected, teacher_end) < err(plain, teacher_end)
    # a DDIM teacher for a gDDIM student (the pairing is the caller's: D-DPM-Solver's teacher is DDIM)
    cal_ddim_teacher = calibrate(base, gaussian_denoiser, x1, 4, factor=10, teacher=DDIMBase(clip=False))
    assert cal_ddim_teacher.lambdas != cal.lambdas


def test_lambdas_do_not_depend_on_the_split_of_the_batch():
    base, x1 = DDIMBase(clip=True), noise64(48, seed=4)
    net = TinyNet().double()
    whole = calibrate(base, net, x1, 5, factor=3)
    halves = calibrate(base, net, x1, 5, factor=3, chunks=2)
    uneven = calibrate(base, net, x1, 5, factor=3, chunks=[slice(0, 7), slice(7, 30), slice(30, 48)])
    for other in (halves, uneven):
        np.testing.assert_allclose(other.lambdas, whole.lambdas, rtol=1e-12, atol=1e-12)
    # two "processes" (threads), each holding half the batch, meeting in an all-reduce of the [num, den] sums
    targets = teacher_targets(base, net, x1, 5, factor=3)
    halves_idx = [slice(0, 24), slice(24, 48)]
    barrier, box, results = threading.Barrier(2), [None, None], [None, None]

    def all_reduce(rank):
        def reduce(local):
            box[rank] = local.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()  # nobody overwrites its slot before both have read the sum
            return total
        return reduce

    def run(rank):
        sl = halves_idx[rank]
        results[rank] = fit_lambdas(base, net, x1[sl], 5, [tg[sl] for tg in targets], reduce=all_reduce(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results[0].lambdas == results[1].lambdas
    np.testing.assert_allclose(results[0].lambdas, whole.lambdas, rtol=1e-12, atol=1e-12)


def test_sampler_checks_lambda_count():
    with pytest.raises(ValueError, match="3 fitted"):
        DODESampler(lambdas=[0.1, 0.2, 0.3])(gaussian_denoiser, noise64(2), 4)


def test_gathered_chunk_sums_give_the_one_process_lambdas_bit_for_bit():
    """`gather`: each "process" (thread) holds whole chunks of the one-process chunk list; the per-chunk sums put back
    in chunk order and summed from zero reproduce the 1-process fit exactly (not only to rounding), float32 network."""
    base, x1 = GDDIMBase(order=1, clip=True), noise64(30, seed=5).float()
    net = TinyNet()
    chunks = [slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 30)]
    targets = teacher_targets(base, net, x1, 4, factor=2, chunks=chunks)
    whole = fit_lambdas(base, net, x1, 4, targets, chunks=chunks)
    owned = {0: [0, 1, 2], 1: [3]}  # uneven shares of whole chunks
    barrier, box, results = threading.Barrier(2), [None, None], [None, None]

    def gather_for(rank):
        def gather(rows):
            box[rank] = rows.clone()
            barrier.wait()
            table = torch.zeros((len(chunks), rows.shape[1]), dtype=torch.float64)
            for r in (0, 1):
                for k, pos in enumerate(owned[r]):
                    table[pos] = box[r][k]
            barrier.wait()
            return table
        return gather

    def run(rank):
        idx = torch.cat([torch.arange(chunks[p].start, chunks[p].stop) for p in owned[rank]])
        local, at = [], 0
        for p in owned[rank]:
            n = chunks[p].stop - chunks[p].start
            local.append(slice(at, at + n))
            at += n
        results[rank] = fit_lambdas(base, net, x1[idx], 4, [tg[idx] for tg in targets], chunks=local,
                                    gather=gather_for(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results[0].lambdas == results[1].lambdas == whole.lambdas
    assert results[0].numerators == whole.numerators and results[0].denominators == whole.denominators
    with pytest.raises(ValueError, match="not both"):
        fit_lambdas(base, net, x1, 4, targets, reduce=lambda s: s, gather=lambda r: r)
