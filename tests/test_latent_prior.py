"""Latent prior (sferd-method.md §8, §10): code statistics, the β = 0.008 DDPM, DDIM against an exact Gaussian
ε-predictor, the MLP-with-skip denoiser, and a short training run."""

import math

import pytest
import torch

from sferd.methods.draws import GeneratorDraws
from sferd.methods.latent_prior import LatentDiffusion, LatentStats, train_prior_step
from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig

T, BETA = 1000, 0.008
TINY = LatentMLPConfig(latent_dim=6, width=32, num_layers=4, time_emb_dim=16)


def _abar(t: int, beta: float = BETA) -> float:
    """Reference ᾱ_t for index t ∈ {0 … T−1}: t + 1 factors of (1 − β), the DDPM convention."""
    return (1.0 - beta) ** (t + 1)


def gaussian_eps(m: torch.Tensor, s: torch.Tensor, beta: float = BETA):
    """The exact ε-predictor E[ε | z_t] for data z0 ~ N(m, diag s²).

    z_t = √ᾱ z0 + √(1−ᾱ) ε is jointly Gaussian with ε: Cov(ε, z_t) = √(1−ᾱ), Var(z_t) = ᾱ s² + 1 − ᾱ, so
    E[ε | z_t] = √(1−ᾱ) (z_t − √ᾱ m) / (ᾱ s² + 1 − ᾱ). ᾱ is taken from the closed form, not from the module.
    """
    def model(z_t, t, y=None):
        assert y is None
        assert t.dtype == torch.long and t.shape == (z_t.shape[0],)
        assert bool((t == t[0]).all())
        a = _abar(int(t[0]), beta)
        return math.sqrt(1 - a) * (z_t - math.sqrt(a) * m) / (a * s**2 + 1 - a)
    return model


# --------------------------------------------------------------------------------------------- LatentStats

def test_stats_round_trip_and_values():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(300, 5, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0]) + torch.arange(5.0)
    stats = LatentStats.fit(codes)
    torch.testing.assert_close(stats.mean, codes.mean(0))
    torch.testing.assert_close(stats.std, codes.std(0))
    z_n = stats.normalize(codes)
    torch.testing.assert_close(z_n.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z_n.std(0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.denormalize(z_n), codes, atol=1e-5, rtol=1e-6)
    other = torch.randn(7, 5, generator=g)
    torch.testing.assert_close(stats.normalize(stats.denormalize(other)), other, atol=1e-5, rtol=1e-6)


def test_stats_constant_dimension_is_safe():
    codes = torch.randn(50, 3)
    codes[:, 1] = 4.25  # a dead code dimension
    stats = LatentStats.fit(codes, eps=1e-6)
    assert float(stats.std[1]) == pytest.approx(1e-6)
    z_n = stats.normalize(codes)
    assert torch.isfinite(z_n).all()
    assert torch.equal(z_n[:, 1], torch.zeros(50))
    torch.testing.assert_close(stats.denormalize(z_n)[:, 1], codes[:, 1])


def test_stats_state_dict_round_trip():
    stats = LatentStats.fit(torch.randn(40, 4) * 3 + 1)
    sd = stats.state_dict()
    assert set(sd) == {"mean", "std"}
    back = LatentStats.from_state_dict(sd)
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
    sd["mean"].add_(1.0)  # the state dict is a copy: editing it must not touch the stats it came from
    assert not torch.equal(sd["mean"], stats.mean)
    with pytest.raises(ValueError):
        LatentStats.from_state_dict({"mean": torch.zeros(3)})
    with pytest.raises(ValueError):
        LatentStats(mean=torch.zeros(3), std=torch.ones(4))
    with pytest.raises(ValueError):
        LatentStats.fit(torch.randn(1, 4))


# ------------------------------------------------------------------------------------------ LatentDiffusion

def test_alphas_cumprod_closed_form():
    d = LatentDiffusion()
    assert d.alphas_cumprod.dtype == torch.float64 and d.alphas_cumprod.shape == (T,)
    for t in (0, 1, 499, 998, 999):
        assert float(d.alphas_cumprod[t]) == pytest.approx(_abar(t), rel=1e-12)
    # 0.992^1000 = e^{1000·ln 0.992} ≈ e^{−8.03}: small enough that z_{T−1} is essentially N(0, I).
    assert float(d.alphas_cumprod[-1]) == pytest.approx(math.exp(1000 * math.log(0.992)), rel=1e-12)
    assert 3.0e-4 < float(d.alphas_cumprod[-1]) < 3.5e-4
    assert d.sqrt_alphas_cumprod.dtype == torch.float32


def test_q_sample_formula_and_statistics():
    d = LatentDiffusion()
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0, 7, 250, 998, 999])
    want = torch.stack([math.sqrt(_abar(int(ti))) * z0[i] + math.sqrt(1 - _abar(int(ti))) * noise[i]
                        for i, ti in enumerate(t)])
    torch.testing.assert_close(d.q_sample(z0, t, noise), want)

    # Moments at one level: constant data c → mean √ᾱ c, std √(1 − ᾱ).
    n, tt, c = 20000, 300, 0.7
    z_t = d.q_sample(torch.full((n, 2), c), torch.full((n,), tt), torch.randn(n, 2, generator=g))
    assert float(z_t.mean()) == pytest.approx(math.sqrt(_abar(tt)) * c, abs=0.02)
    assert float(z_t.std()) == pytest.approx(math.sqrt(1 - _abar(tt)), rel=0.02)
    with pytest.raises(ValueError):
        d.q_sample(z0, torch.tensor([0, 1, 2, 3, T]), noise)


def test_loss_is_l1_of_exact_predictor():
    """With the exact predictor on N(0, 1) data the residual ε − E[ε|z_t] has variance ᾱ_t, so the L1 loss is
    √(2/π)·mean_t √ᾱ_t (≈ 0.196); an L2 loss (≈ 0.06) or a wrong t distribution would miss it."""
    d = LatentDiffusion()
    model = _exact_per_sample_eps(d)
    g = torch.Generator().manual_seed(2)
    loss = d.loss(model, torch.randn(40000, 4, generator=g), draws=GeneratorDraws(g, 40000)).mean()
    want = math.sqrt(2 / math.pi) * sum(math.sqrt(_abar(t)) for t in range(T)) / T
    assert float(loss) == pytest.approx(want, rel=0.02)


def _exact_per_sample_eps(d: LatentDiffusion):
    """E[ε | z_t] for N(0, 1) data with a different t per row: √(1−ᾱ_t) z_t."""
    def model(z_t, t, y=None):
        a = torch.tensor([_abar(int(ti)) for ti in t], dtype=torch.float64)
        return ((1 - a).sqrt()[:, None] * z_t.double()).float()
    return model


def test_timesteps_subsequence():
    d = LatentDiffusion()
    ts = d.timesteps(100)
    assert len(ts) == 100 and ts[0] == T - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert all(9 <= a - b <= 11 for a, b in zip(ts, ts[1:]))  # evenly spaced, ≈ 999/99 apart
    assert d.timesteps(1) == [T - 1]
    assert d.timesteps(2) == [T - 1, 0]
    assert d.timesteps(T) == list(range(T - 1, -1, -1))
    for bad in (0, T + 1):
        with pytest.raises(ValueError):
            d.timesteps(bad)


# Normalised codes have std ≈ 1 per dimension, so the Gaussian oracle uses scales around 1.
M = torch.tensor([0.3, -0.5, 0.0, 0.2])
S = torch.tensor([0.6, 0.8, 1.0, 1.2])


def test_ddim_exact_gaussian_matches_data_distribution():
    """With the exact ε̂ the only errors are DDIM's discretisation and the t = 0 → z₀ jump (σ₀ = √(β/(1−β)) ≈ 0.09,
    and x̂₀ there is a posterior mean). Both shrink the spread: at 100 steps by 4–9 % for s ∈ [0.6, 1.2] (the
    uniform-in-t grid is coarse in σ near t = 0: σ goes 0.30 → 0.09 in its last step), and by ≤ 2 % with all
    1000 steps. The checks allow that much and no more."""
    d = LatentDiffusion()
    model = gaussian_eps(M, S)
    noise = torch.randn(4000, 4, generator=torch.Generator().manual_seed(3))
    out = d.ddim_sample(model, noise, steps=100, clip_noise=None, clip_x0=None)
    assert out.shape == (4000, 4) and out.dtype == torch.float32
    # Sampling error with n = 4000 is ≈ s/63 for the mean and ≈ s/90 for the std.
    torch.testing.assert_close(out.mean(0), M, atol=0.05, rtol=0)
    ratio = out.std(0) / S
    assert bool((ratio > 0.85).all() and (ratio < 1.03).all()), ratio

    # η = 0 DDIM with a linear predictor is an affine map z_T ↦ a z_T + b with b ≈ m, a ≈ s: a noise-free
    # version of the same check, tight enough to catch an off-by-one in ᾱ's index or a missing square root.
    def affine(steps):
        b = d.ddim_sample(model, torch.zeros(1, 4), steps=steps, clip_noise=None, clip_x0=None)[0]
        a = d.ddim_sample(model, torch.ones(1, 4), steps=steps, clip_noise=None, clip_x0=None)[0] - b
        return a, b

    a100, b100 = affine(100)
    torch.testing.assert_close(b100, M, atol=0.01, rtol=0)
    assert bool(((a100 / S > 0.88) & (a100 / S < 1.0)).all()), a100 / S
    a_all, b_all = affine(T)
    torch.testing.assert_close(b_all, M, atol=0.01, rtol=0)
    torch.testing.assert_close(a_all, S, rtol=0.025, atol=0)
    assert bool(((a_all - S).abs() < (a100 - S).abs()).all())  # more steps → closer to the data


def test_ddim_clamps():
    d = LatentDiffusion()
    model = gaussian_eps(M, S * 4)  # a wide distribution, so unclamped samples leave [−1, 1]
    noise = 3 * torch.randn(500, 4, generator=torch.Generator().manual_seed(4))
    free = d.ddim_sample(model, noise, steps=20, clip_noise=None, clip_x0=None)
    assert free.abs().max() > 1.5
    clamped = d.ddim_sample(model, noise, steps=20)  # defaults: clip_noise = clip_x0 = 1
    assert clamped.abs().max() <= 1.0
    # clip_noise acts on z_T only: same as clamping the noise by hand.
    torch.testing.assert_close(d.ddim_sample(model, noise, steps=20, clip_noise=1.0, clip_x0=None),
                               d.ddim_sample(model, noise.clamp(-1, 1), steps=20, clip_noise=None, clip_x0=None))
    with pytest.raises(ValueError):
        d.ddim_sample(model, noise, steps=20, clip_x0=0.0)


def test_ddim_steps_by_hand():
    """Reference DDIM in float64 with closed-form ᾱ on a short, coarse schedule (T = 10, β = 0.1, where ᾱ stays
    large enough for every term to matter): visit 9 → 5 → 0; at each level clamp x̂₀, re-derive ε̂ from it,
    step; at t = 0 return the clamped x̂₀.

    The ε-model mixes dimensions on purpose: with a per-dimension model a clamped coordinate stays clamped to the
    end, and skipping the ε̂ re-derivation would go unnoticed."""
    beta, clip = 0.1, 0.5
    d = LatentDiffusion(num_steps=10, beta=beta)
    assert d.timesteps(3) == [9, 5, 0]
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def model(z_t, t, y=None):
        return torch.tanh(z_t.double() @ w + 0.05 * t.double()[:, None]).to(z_t.dtype)

    noise = 1.5 * torch.randn(256, 4, generator=torch.Generator().manual_seed(5))
    z = noise.double().clamp(-1.2, 1.2)
    seq = [9, 5, 0]
    clamped_fraction = []
    for i, t in enumerate(seq):
        a = _abar(t, beta)
        eps = model(z, torch.full((256,), t))
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        clamped_fraction.append(float((x0.abs() > clip).double().mean()))
        x0 = x0.clamp(-clip, clip)
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        if i == len(seq) - 1:
            want = x0
            break
        a_next = _abar(seq[i + 1], beta)
        z = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    assert all(0.1 < f < 0.9 for f in clamped_fraction), clamped_fraction  # the clamp path is really exercised
    got = d.ddim_sample(model, noise, steps=3, clip_noise=1.2, clip_x0=clip)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_ddim_deterministic_with_mlp():
    torch.manual_seed(0)
    mlp = LatentMLP(TINY).eval()
    d = LatentDiffusion()
    noise = torch.randn(8, TINY.latent_dim, generator=torch.Generator().manual_seed(6))
    a = d.ddim_sample(mlp, noise.clone(), steps=10)
    b = d.ddim_sample(mlp, noise.clone(), steps=10)
    assert torch.equal(a, b)
    assert not torch.equal(a, d.ddim_sample(mlp, noise + 0.5, steps=10))
    assert a.shape == noise.shape and not a.requires_grad


# ------------------------------------------------------------------------------------------------ LatentMLP

def test_mlp_shapes_and_skip_widths():
    torch.manual_seed(0)
    mlp = LatentMLP(TINY)
    c = TINY
    assert len(mlp.layers) == c.num_layers - 1  # num_layers counts the output Linear too
    assert mlp.layers[0].linear.in_features == c.latent_dim
    assert all(layer.linear.in_features == c.width + c.latent_dim for layer in mlp.layers[1:])
    assert mlp.out.in_features == c.width + c.latent_dim and mlp.out.out_features == c.latent_dim
    assert all(layer.cond_proj[-1].in_features == c.width == layer.cond_proj[-1].out_features
               for layer in mlp.layers)

    # The widths are not only declared: record what each Linear of the main stack really receives.
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
             for m in [layer.linear for layer in mlp.layers] + [mlp.out]]
    z = torch.randn(5, c.latent_dim)
    out = mlp(z, torch.tensor([0, 1, 500, 998, 999]))
    for h in hooks:
        h.remove()
    assert seen == [c.latent_dim] + [c.width + c.latent_dim] * (c.num_layers - 1)
    assert out.shape == (5, c.latent_dim)
    assert torch.isfinite(out).all()


def test_mlp_skip_carries_the_input():
    """z_t is re-injected into the hidden layers and into the output layer: silence the other paths and the
    output must still depend on z_t; silence every path and it must not (the control)."""
    t = torch.tensor([10, 10])
    z = torch.randn(1, TINY.latent_dim).repeat(2, 1)
    z[1] += 1.0

    def z_matters(silence_layer0=False, silence_hidden=False, silence_out_skip=False):
        torch.manual_seed(0)
        mlp = LatentMLP(TINY).eval()
        with torch.no_grad():
            for i, layer in enumerate(mlp.layers):
                if (i == 0 and silence_layer0) or silence_hidden:
                    layer.linear.weight.zero_()
            if silence_out_skip:
                mlp.out.weight[:, TINY.width:].zero_()
        out = mlp(z, t)
        return not torch.allclose(out[0], out[1])

    assert z_matters()
    assert z_matters(silence_layer0=True, silence_out_skip=True)  # only the hidden-layer skips are left
    assert z_matters(silence_hidden=True)  # only the output layer's skip is left
    assert not z_matters(silence_hidden=True, silence_out_skip=True)


def test_mlp_time_changes_output():
    torch.manual_seed(0)
    mlp = LatentMLP(TINY).eval()
    z = torch.randn(3, TINY.latent_dim).repeat(2, 1)
    out = mlp(z, torch.tensor([0, 0, 0, 999, 999, 999]))
    assert not torch.allclose(out[:3], out[3:])


def test_mlp_conditioning_rules():
    torch.manual_seed(0)
    z, t = torch.randn(4, TINY.latent_dim), torch.tensor([1, 2, 3, 4])
    uncond = LatentMLP(TINY)
    assert uncond.class_emb is None
    with pytest.raises(ValueError, match="unconditional"):
        uncond(z, t, torch.tensor([0, 1, 2, 3]))
    cond = LatentMLP(LatentMLPConfig(**{**TINY.__dict__, "num_classes": 5})).eval()
    assert cond.class_emb.num_embeddings == 5 and cond.class_emb.embedding_dim == TINY.width
    with pytest.raises(ValueError, match="y is required"):
        cond(z, t)
    a, b = cond(z, t, torch.tensor([0, 1, 2, 3])), cond(z, t, torch.tensor([4, 4, 4, 4]))
    assert a.shape == z.shape and not torch.allclose(a, b)  # the label matters
    with pytest.raises(ValueError):
        uncond(z[:, :-1], t)
    with pytest.raises(ValueError):
        uncond(z, t[:-1])
    with pytest.raises(ValueError):
        LatentMLPConfig(num_layers=1)


def test_mlp_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    mlp = LatentMLP(LatentMLPConfig(**{**TINY.__dict__, "num_classes": 3}))
    d = LatentDiffusion()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = d.loss(mlp, torch.randn(8, TINY.latent_dim), draws=GeneratorDraws(torch.Generator().manual_seed(7), 8), y=y)
    assert loss.shape == (8,)
    loss = loss.mean()
    loss.backward()
    for name, p in mlp.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_config_defaults_are_paper_scale():
    c = LatentMLPConfig()
    assert (c.latent_dim, c.width, c.num_layers, c.time_emb_dim, c.num_classes, c.dropout) == \
        (512, 2048, 10, 64, None, 0.0)


# ----------------------------------------------------------------------------------------------- training

def test_short_training_run_reduces_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    codes = torch.tensor([0.5, -0.5]) + torch.tensor([0.3, 0.6]) * torch.randn(4096, 2, generator=g)
    stats = LatentStats.fit(codes)
    z_n = stats.normalize(codes)
    mlp = LatentMLP(LatentMLPConfig(latent_dim=2, width=64, num_layers=3, time_emb_dim=16))
    d = LatentDiffusion()
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.01)
    before = [p.detach().clone() for p in mlp.parameters()]
    losses = [train_prior_step(mlp, d, z_n[torch.randint(0, 4096, (256,), generator=g)], opt, generator=g)
              for _ in range(300)]
    assert all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, mlp.parameters()))
    start, end = sum(losses[:5]) / 5, sum(losses[-50:]) / 50
    # z_n ≈ N(0, I), so the best achievable L1 loss is √(2/π)·mean_t √ᾱ_t ≈ 0.196 (see the loss test).
    oracle = math.sqrt(2 / math.pi) * sum(math.sqrt(_abar(t)) for t in range(T)) / T
    assert end < 0.5 * start
    assert end < 1.25 * oracle

    # The trained prior already puts the de-normalised samples' mean near the data mean.
    mlp.eval()
    z = stats.denormalize(d.ddim_sample(mlp, torch.randn(2000, 2, generator=g), steps=50,
                                        clip_noise=None, clip_x0=None))
    torch.testing.assert_close(z.mean(0), torch.tensor([0.5, -0.5]), atol=0.15, rtol=0)
