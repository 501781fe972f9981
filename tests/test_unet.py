"""The PD U-Net: shapes, zero-init, block bookkeeping, received-attention capture against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sferd.nn.unet import (
    AttentionBlock,
    UNet,
    UNetConfig,
    count_parameters,
    received_attention,
    timestep_embedding,
)

# Tiny stand-ins for the paper topologies: same block structure, far fewer channels.
QUICK = UNetConfig(1, 1, 16, 16, (1, 2), 1, (8,), norm_groups=8)
CIFAR_LIKE = UNetConfig(3, 3, 32, 8, (1, 1, 1), 3, (16, 8), num_heads=2, norm_groups=4)
IMAGENET_LIKE = UNetConfig(
    3, 6, 64, 8, (1, 2, 3, 4), 3, (32, 16, 8), head_channels=8, num_classes=10, norm_groups=4, dropout=0.1
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def _inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    u = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, u, y


def _build(cfg: UNetConfig, seed: int = 0, perturb: bool = True) -> UNet:
    """A model in eval mode whose zero-initialised layers were moved away from zero.

    With zero-init residual branches every attention block's output projection is zero and the network output is
    identically zero, so without the perturbation most checks would pass vacuously.
    """
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net


def _attention_order(net: UNet, cfg: UNetConfig) -> list[tuple[str, int, int]]:
    """(part, resolution, index) of the attention blocks as they actually run, derived independently of the
    blocks' ``key`` attribute: part from the container, resolution from the input tensor, index by counting."""
    part_of = {}
    for part, container in (("encoder", net.encoder), ("middle", net.middle), ("decoder", net.decoder)):
        for m in container.modules():
            if isinstance(m, AttentionBlock):
                part_of[m] = part
    seen: list[tuple[str, int]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append((part_of[mod], args[0].shape[-1])))
        for m in part_of
    ]
    try:
        with torch.no_grad():
            net(*_inputs(cfg, batch=1))
    finally:
        for h in handles:
            h.remove()
    counts: dict[tuple[str, int], int] = {}
    order = []
    for part, res in seen:
        order.append((part, res, counts.get((part, res), 0)))
        counts[(part, res)] = counts.get((part, res), 0) + 1
    return order


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), norm_groups=4),
        UNetConfig(3, 6, 16, 8, (1, 2), 2, (8,), num_heads=2, norm_groups=4),  # 'both': 2C outputs
        UNetConfig(3, 3, 32, 8, (1, 1, 2), 1, (16,), head_channels=4, num_classes=5, norm_groups=4),
        QUICK,
    ],
    ids=["1ch-8px", "3ch-2C-16px", "cond-32px", "quickstart"],
)
def test_output_shape_and_zero_init(cfg):
    torch.manual_seed(0)
    net = UNet(cfg)
    x, u, y = _inputs(cfg, batch=3)
    out = net(x, u, y)
    assert out.shape == (3, cfg.out_channels, cfg.resolution, cfg.resolution)
    # The output conv is zero-initialised: a fresh network predicts exactly zero.
    assert torch.equal(out, torch.zeros_like(out))
    # ... and after perturbation it no longer does (the check above is not trivially true).
    out2 = _build(cfg)(x, u, y)
    assert out2.shape == out.shape and out2.abs().max() > 0


def test_quickstart_parameter_count_is_stable():
    # Regression guard: any change to the architecture shows up here (recompute deliberately if intended).
    assert count_parameters(UNet(UNetConfig(1, 1, 16, 32, (1, 2), 1, (8,), norm_groups=8))) == 826_337


def test_scalar_u_broadcasts_like_a_vector():
    net = _build(QUICK)
    x, _, _ = _inputs(QUICK, batch=3)
    assert torch.allclose(net(x, torch.tensor(0.3)), net(x, torch.full((3,), 0.3)), atol=1e-6)


def test_time_and_class_inputs_matter():
    cfg = UNetConfig(1, 2, 8, 8, (1, 2), 1, (4,), num_classes=3, norm_groups=4)
    net = _build(cfg)
    x, u, _ = _inputs(cfg, batch=2)
    y0, y1 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    base = net(x, u, y0)
    assert not torch.allclose(base, net(x, u, y1))
    assert not torch.allclose(base, net(x, 1.0 - u, y0))
    # The class embedding is Linear(one_hot(y)) without bias, as specified.
    emb = net.embed(u, y1)
    expected = net.time_embed(timestep_embedding(u, cfg.base_channels)) + net.class_embed(
        F.one_hot(y1, 3).float()
    )
    assert torch.allclose(emb, expected, atol=1e-6)


def test_timestep_embedding_closed_form():
    u = torch.tensor([0.0, 0.25])
    emb = timestep_embedding(u, 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 3)
    args = 1000 * u[:, None] * freqs
    assert torch.allclose(emb, torch.cat([args.sin(), args.cos()], dim=1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ block bookkeeping


@pytest.mark.parametrize("cfg", [CIFAR_LIKE, IMAGENET_LIKE, QUICK], ids=["cifar", "imagenet", "quick"])
def test_attention_blocks_match_the_built_network(cfg):
    net = UNet(cfg)
    assert cfg.attention_blocks() == _attention_order(net, cfg)
    assert [m.key for m in net.attention_modules()] == cfg.attention_blocks()


def test_cifar_topology_block_counts():
    blocks = CIFAR_LIKE.attention_blocks()
    assert [b for b in blocks if b[0] == "decoder" and b[1] == 16] == [("decoder", 16, i) for i in range(4)]
    assert [b for b in blocks if b[0] == "encoder"] == [("encoder", 16, i) for i in range(3)] + [
        ("encoder", 8, i) for i in range(3)
    ]
    assert ("middle", 8, 0) in blocks and len(blocks) == 6 + 1 + 8
    assert CIFAR_LIKE.resolve_capture(("decoder", 16, "last")) == ("decoder", 16, 3)
    assert CIFAR_LIKE.resolve_capture(("decoder", 16, "first")) == ("decoder", 16, 0)
    assert CIFAR_LIKE.resolve_capture(("encoder", 8, 2)) == ("encoder", 8, 2)


def test_imagenet_topology_block_counts():
    blocks = IMAGENET_LIKE.attention_blocks()
    assert len(blocks) == 3 * 3 + 1 + 3 * 4  # 3 attention levels × (3 enc + 4 dec) + middle
    assert blocks[9] == ("middle", 8, 0)
    assert blocks[-1] == ("decoder", 32, 3)


# ------------------------------------------------------------------------------------------------ capture


def _naive_block(block: AttentionBlock, x: torch.Tensor):
    """Reference attention from the block's weights with the full softmax map: (output, received c)."""
    b, c, hh, ww = x.shape
    heads, d = block.heads, c // block.heads
    qkv = F.conv2d(block.norm(x), block.qkv.weight, block.qkv.bias).reshape(b, 3 * c, hh * ww)
    q, k, v = (t.reshape(b, heads, d, hh * ww) for t in qkv.split(c, dim=1))  # channel = (head, d)
    a = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d), dim=-1)  # (B, heads, N, N)
    h = torch.einsum("bhij,bhdj->bhdi", a, v).reshape(b, c, hh, ww)
    out = x + F.conv2d(h, block.proj.weight, block.proj.bias)
    return out, a.mean(dim=1).sum(dim=1)


@pytest.mark.parametrize(
    "target",
    [("decoder", 16, "last"), ("decoder", 8, 1), ("encoder", 16, "first"), ("middle", 8, "last"), ("encoder", 8, 2)],
)
def test_capture_matches_naive_reference(target):
    cfg = CIFAR_LIKE  # two heads, so the head average is exercised
    net = _build(cfg)
    key = cfg.resolve_capture(target)
    block = next(m for m in net.attention_modules() if m.key == key)
    seen = {}
    handle = block.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out[0]))
    x, u, y = _inputs(cfg, batch=3)
    with torch.no_grad():
        out, c = net(x, u, y, capture=target)
        handle.remove()
        ref_out, ref_c = _naive_block(block, seen["x"])
    r = key[1]
    assert c.shape == (3, r * r)
    assert torch.allclose(c.mean(dim=1), torch.ones(3), atol=1e-5)
    assert (c >= 0).all()
    assert torch.allclose(c, ref_c, atol=1e-5, rtol=1e-4)
    # The block's fast path (scaled_dot_product_attention) agrees with the naive attention too.
    assert torch.allclose(seen["out"], ref_out, atol=1e-5, rtol=1e-4)
    # Non-trivial attention: uniform attention would give c == 1 everywhere and prove nothing.
    assert c.std() > 1e-3


def test_chunked_received_attention_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 50, 4, generator=g), torch.randn(2, 3, 50, 4, generator=g)
    full = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(1).sum(1)
    for chunk in (1, 7, 50, None):
        assert torch.allclose(received_attention(q, k, chunk_size=chunk), full, atol=1e-5)


def test_capture_does_not_change_the_output():
    net = _build(CIFAR_LIKE)
    x, u, y = _inputs(CIFAR_LIKE)
    with torch.no_grad():
        plain = net(x, u, y)
        for target in [("decoder", 16, "last"), ("encoder", 8, 0), ("middle", 8, 0)]:
            out, _ = net(x, u, y, capture=target)
            assert torch.equal(out, plain)


def test_only_the_selected_block_computes_received_attention(monkeypatch):
    import sferd.nn.unet as unet_mod

    calls = []
    real = unet_mod.received_attention
    monkeypatch.setattr(unet_mod, "received_attention", lambda q, k, **kw: calls.append(q.shape) or real(q, k, **kw))
    net = _build(CIFAR_LIKE)
    with torch.no_grad():
        net(*_inputs(CIFAR_LIKE))
        assert calls == []
        net(*_inputs(CIFAR_LIKE), capture=("decoder", 8, 0))
    assert len(calls) == 1 and calls[0][2] == 64


def test_encode_middle_decode_compose_to_forward():
    cfg = IMAGENET_LIKE
    net = _build(cfg)
    x, u, y = _inputs(cfg, batch=2)
    with torch.no_grad():
        emb = net.embed(u, y)
        h, skips = net.encode(x, emb)
        assert h is skips[-1]
        n_skips = len(skips)
        h, _ = net.middle(h, emb)
        out, c = net.decode(h, skips, emb, capture=("decoder", 16, "last"))
        assert len(skips) == n_skips  # decode() must not consume the caller's list
        ref_out, ref_c = net(x, u, y, capture=("decoder", 16, "last"))
    assert torch.equal(out, ref_out) and torch.equal(c, ref_c)
    with pytest.raises(ValueError, match="decoder"):
        net.decode(h, skips, emb, capture=("encoder", 16, 0))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "target",
    [("decoder", 32, "last"), ("decoder", 16, 4), ("decoder", 16, "middle"), ("bottleneck", 8, 0), ("decoder", 16),
     ("decoder", 16, -1)],
)
def test_bad_capture_target_lists_available_blocks(target):
    net = UNet(CIFAR_LIKE)
    with pytest.raises(ValueError, match="Available attention blocks") as info:
        net(*_inputs(CIFAR_LIKE), capture=target)
    assert "('decoder', 16, 3)" in str(info.value) and "('middle', 8, 0)" in str(info.value)


def test_labels_required_iff_conditional():
    cond = UNet(UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), num_classes=3, norm_groups=4))
    x, u, _ = _inputs(cond.config)
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, u)
    uncond = UNet(UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), norm_groups=4))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, u, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm_groups=32), "norm_groups"),  # 8 and 16 channels
        (dict(base_channels=12, norm_groups=8), "norm_groups"),
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
        (dict(num_heads=3), "num_heads"),
        (dict(head_channels=5), "head_channels"),
        (dict(resolution=6, channel_mult=(1, 2, 2)), "halved"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mult=()), "channel_mult"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    base = dict(in_channels=1, out_channels=1, resolution=16, base_channels=8, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(8,), norm_groups=4)
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**base, **kwargs})


def test_config_accepts_lists_and_stays_hashable():
    a = UNetConfig(1, 1, 16, 8, [1, 2], 1, [8], norm_groups=4)
    b = UNetConfig(1, 1, 16, 8, (1, 2), 1, (8,), norm_groups=4)
    assert a == b and hash(a) == hash(b)


def test_wrong_input_shape_raises():
    net = UNet(QUICK)
    with pytest.raises(ValueError, match="expected x of shape"):
        net(torch.zeros(2, 3, 16, 16), torch.rand(2))


# ------------------------------------------------------------------------------------------------ training


def test_determinism_same_seed_same_weights_and_outputs():
    cfg = IMAGENET_LIKE
    torch.manual_seed(123)
    a = UNet(cfg)
    torch.manual_seed(123)
    b = UNet(cfg)
    torch.manual_seed(124)
    c = UNet(cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    x, u, y = _inputs(cfg)
    with torch.no_grad():
        for net in (a, b):  # perturb both identically so the outputs are non-trivial
            torch.manual_seed(7)
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert torch.equal(a.eval()(x, u, y), b.eval()(x, u, y))


def test_gradient_reaches_every_parameter():
    cfg = UNetConfig(3, 6, 16, 8, (1, 2), 1, (16, 8), num_heads=2, num_classes=4, norm_groups=4, dropout=0.1)
    net = _build(cfg).train()
    x, u, y = _inputs(cfg, batch=4)
    net(x, u, y).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    dead = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize("resample", [None, "down", "up"])
def test_resblock_matches_its_definition(resample):
    from sferd.nn.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(4, 8, 6, groups=2, dropout=0.0, resample=resample)
    with torch.no_grad():
        block.conv2.weight.normal_(0, 0.2)  # zero-init would hide the residual branch
        x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 6)
        rs = {None: lambda t: t, "down": lambda t: F.avg_pool2d(t, 2),
              "up": lambda t: F.interpolate(t, scale_factor=2, mode="nearest")}[resample]
        h = block.conv1(rs(F.silu(block.norm1(x))))
        scale, shift = block.emb_proj(F.silu(emb)).split(8, dim=1)
        h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = block.conv2(F.silu(h))
        expected = block.skip(rs(x)) + h  # no 1/sqrt(2) rescale of the residual sum
        assert torch.allclose(block(x, emb), expected, atol=1e-5)


@pytest.mark.parametrize(
    "resolution, mult, blocks, attn",
    [(8, [1, 2], 1, [4]), (32, [1, 1, 1], 3, [16, 8]), (64, [1, 2, 3, 4], 3, [32, 16, 8]), (16, [1, 2], 2, [])],
)
def test_spec_checker_mirrors_the_network_attention_blocks(resolution, mult, blocks, attn):
    """The validator lists attention blocks without torch; it must agree with the network it validates for."""
    from sferd.spec.checks import attention_blocks
    from sferd.spec.models import UNetSpec

    spec = UNetSpec(base_channels=32, channel_mult=mult, num_res_blocks=blocks, attention_resolutions=attn)
    cfg = UNetConfig(3, 3, resolution, 32, tuple(mult), blocks, tuple(attn))
    assert attention_blocks(spec, resolution) == cfg.attention_blocks()
    net = UNet(cfg)
    built = [m.key for m in net.modules() if hasattr(m, "key") and m.__class__.__name__ == "AttentionBlock"]
    assert sorted(built) == sorted(cfg.attention_blocks())  # the blocks the network really has
