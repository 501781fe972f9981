"""Attention-guided teacher (sferd-method.md §6): mask, degradation, guidance identities."""

import pytest
import torch

from sferd.diffusion.denoiser import NetworkDenoiser
from sferd.diffusion.parameterization import to_x0_eps
from sferd.diffusion.schedule import alpha_sigma, broadcast, logsnr, time_input
from sferd.methods.guidance import GuidanceConfig, GuidedDenoiser, attention_mask, degrade, gaussian_blur
from sferd.nn.unet import UNet, UNetConfig

CFG = UNetConfig(in_channels=1, out_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1, attention_resolutions=(4,), norm_groups=4)
BLOCK = ("decoder", 4, "last")


def _net(scale=0.05, seed=0):
    """A U-Net with its zero-inits perturbed (else attention is uniform and outputs are 0)."""
    torch.manual_seed(seed)
    net = UNet(CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net.eval()


def _inputs(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 0.8 + 0.1
    return x_t, t


def test_received_attention_mask_selects_above_threshold():
    net = _net(scale=0.5)
    x_t, t = _inputs()
    _, c = net(x_t, time_input(logsnr(t)), capture=BLOCK)
    assert torch.allclose(c.mean(1), torch.ones(len(c)), atol=1e-5)
    assert c.std() > 1e-3, "attention should not be uniform for this test to mean anything"
    for psi in (0.8, 1.0, 1.2):
        m = attention_mask(c, psi, size=(8, 8), channels=1)
        # each 4×4 token covers a 2×2 pixel block
        expected = (c > psi).float().reshape(-1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
        assert torch.equal(m, expected)
    assert attention_mask(c, float(c.max()) + 1e-3, size=(8, 8), channels=1).sum() == 0
    assert attention_mask(c, 0.0, size=(8, 8), channels=1).min() == 1  # softmax weights are > 0


def test_degrade_touches_only_masked_pixels():
    x0 = torch.randn(2, 1, 8, 8) * 2
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:4] = 1
    out = degrade(x0, mask, 5, 3.0)
    clip = x0.clamp(-1, 1)
    assert torch.equal(out[mask == 0], clip[mask == 0])
    blurred = gaussian_blur(clip, 5, 3.0)
    assert torch.equal(out[mask == 1], blurred[mask == 1])
    assert not torch.equal(out[mask == 1], clip[mask == 1])


def test_blur_matches_separable_reflect_reference():
    x = torch.randn(1, 1, 8, 8)
    k, s = 5, 1.5
    ax = torch.arange(k) - k // 2
    w = torch.exp(-(ax.float() ** 2) / (2 * s**2))
    w = w / w.sum()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    ref = torch.nn.functional.conv2d(padded, (w[:, None] * w[None, :])[None, None])
    assert torch.allclose(gaussian_blur(x, k, s), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["x", "v"])
def test_zero_strength_is_the_plain_teacher(kind):
    net = _net()
    x_t, t = _inputs()
    plain = NetworkDenoiser(net, kind)(x_t, t)
    guided = GuidedDenoiser(net, kind, GuidanceConfig(block=BLOCK, strength=0.0, blur_kernel_size=5))(x_t, t)
    assert torch.equal(plain[0], guided[0]) and torch.equal(plain[1], guided[1])


def test_empty_mask_is_the_plain_teacher_when_prediction_in_range():
    net = _net(scale=0.02)  # x-prediction stays inside [-1, 1], so clipping changes nothing
    x_t, t = _inputs()
    plain_x0, _ = NetworkDenoiser(net, "x")(x_t, t)
    assert plain_x0.abs().max() < 1
    g = GuidedDenoiser(net, "x", GuidanceConfig(block=BLOCK, threshold=1e6, strength=0.3, blur_kernel_size=5))
    x0, _ = g(x_t, t)
    assert g.last_mask.sum() == 0
    assert torch.equal(x0, plain_x0)


@pytest.mark.parametrize("kind", ["x", "eps", "v", "both"])
def test_stable_form_equals_eps_form(kind):
    cfg = UNetConfig(**{**CFG.__dict__, "out_channels": 2 if kind == "both" else 1})
    torch.manual_seed(3)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.eval()
    x_t, t = _inputs(seed=4)
    t = torch.full_like(t, 0.5)  # moderate λ: the division by α is harmless here
    w = 0.3
    gcfg = GuidanceConfig(block=BLOCK, threshold=1.0, strength=w, blur_sigma=3.0, blur_kernel_size=5)
    x0_g, eps_g = GuidedDenoiser(net, kind, gcfg)(x_t, t)

    lam = logsnr(t)
    a, s = (broadcast(v, x_t) for v in alpha_sigma(lam))
    out, c = net(x_t, time_input(lam), capture=BLOCK)
    x0, eps = to_x0_eps(kind, out, x_t, a, s)
    x0_deg = degrade(x0, attention_mask(c, 1.0, size=(8, 8), channels=1), 5, 3.0)
    x_t_deg = a * x0_deg + s * eps  # re-noised with the teacher's own ε̂
    _, eps_tilde = to_x0_eps(kind, net(x_t_deg, time_input(lam)), x_t_deg, a, s)
    eps_ref = eps_tilde + (1 + w) * (eps - eps_tilde)
    x0_ref = (x_t - s * eps_ref) / a
    assert torch.allclose(x0_g, x0_ref, atol=1e-4)
    assert torch.allclose(eps_g, eps_ref, atol=1e-4)
    assert not torch.allclose(x0_g, x0, atol=1e-4)  # guidance did something


def test_guided_teacher_is_finite_at_t1():
    net = _net()
    x_t = torch.randn(4, 1, 8, 8)
    x0, eps = GuidedDenoiser(net, "x", GuidanceConfig(block=BLOCK, blur_kernel_size=15))(x_t, torch.ones(4))
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
