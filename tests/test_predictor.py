"""SFERD's semantic encoder and gradient predictor: init identities, what is shared vs trained, weight copying,
checkpoint round trip, the ZResBlock formula, encoder shapes and config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sferd.nn.predictor import (
    EncoderConfig,
    GradientPredictor,
    SemanticEncoder,
    ZResBlock,
    predictor_compatible,
)
from sferd.nn.unet import AttentionBlock, ResBlock, UNet, UNetConfig

TINY = UNetConfig(in_channels=1, out_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), norm_groups=4)
# Class-conditional `both` student (2C outputs), 3 channels, attention at two sizes, 2 res-blocks per level.
COND_BOTH = UNetConfig(in_channels=3, out_channels=6, resolution=16, base_channels=8, channel_mult=(1, 2),
                       num_res_blocks=2, attention_resolutions=(16, 8), num_heads=2, num_classes=5, norm_groups=4)
LATENT = 12


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def _student(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A student whose zero-initialised layers were moved off zero (else its output is identically 0)."""
    torch.manual_seed(seed)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _perturb_own(pred: GradientPredictor, seed: int = 1, scale: float = 0.05) -> None:
    """Move every own parameter off its init: the head, the z-Linears, residual convs and attention projections
    all start at zero, and with any of them at zero G (or its dependence on z) would vanish."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pred.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _inputs(cfg: UNetConfig, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    u = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    z = torch.randn(batch, LATENT, generator=g)
    return x, u, y, z


# ------------------------------------------------------------------------------------------------ predictor


@pytest.mark.parametrize("cfg", [TINY, COND_BOTH], ids=["tiny", "cond-both"])
@pytest.mark.parametrize("init_from_student", [False, True])
def test_init_g_is_zero_and_student_output_exact(cfg, init_from_student):
    student = _student(cfg)
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=init_from_student)
    x, u, y, z = _inputs(cfg)
    out, g = pred(x, u, y, z)
    assert out.shape == (3, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert g.shape == (3, cfg.in_channels, cfg.resolution, cfg.resolution)  # x₀ space even for `both`
    assert torch.count_nonzero(g) == 0
    assert out.abs().max() > 0  # the perturbed student is not trivially zero
    assert torch.equal(out, student(x, u, y))


def test_class_conditional_student_needs_labels():
    pred = GradientPredictor(_student(COND_BOTH), latent_dim=LATENT)
    x, u, y, z = _inputs(COND_BOTH)
    with pytest.raises(ValueError, match="labels"):
        pred(x, u, None, z)
    _perturb_own(pred)
    # y reaches G through the shared embedding.
    _, g1 = pred(x, u, y, z)
    _, g2 = pred(x, u, (y + 1) % COND_BOTH.num_classes, z)
    assert not torch.allclose(g1, g2)


def test_scalar_time_is_broadcast_and_bad_shapes_raise():
    pred = GradientPredictor(_student(TINY), latent_dim=LATENT)
    _perturb_own(pred)
    x, _, _, z = _inputs(TINY)
    out_s, g_s = pred(x, torch.tensor(0.3), None, z)
    out_b, g_b = pred(x, torch.full((3,), 0.3), None, z)
    torch.testing.assert_close(g_s, g_b)
    torch.testing.assert_close(out_s, out_b)
    with pytest.raises(ValueError, match="z of shape"):
        pred(x, torch.rand(3), None, z[:, :-1])
    with pytest.raises(ValueError, match="x_t of shape"):
        pred(x[:, :, :4], torch.rand(3), None, z)


@pytest.mark.parametrize("cfg", [TINY, COND_BOTH], ids=["tiny", "cond-both"])
def test_g_depends_on_z_and_x(cfg):
    pred = GradientPredictor(_student(cfg), latent_dim=LATENT)
    _perturb_own(pred)
    x, u, y, z = _inputs(cfg)
    _, g = pred(x, u, y, z)
    _, g_z = pred(x, u, y, z + 1.0)
    _, g_x = pred(x + 0.5, u, y, z)
    assert g.abs().max() > 1e-4
    assert (g - g_z).abs().max() > 1e-4 * g.abs().max()
    assert (g - g_x).abs().max() > 1e-4 * g.abs().max()


def test_gradients_reach_only_own_params_and_z():
    student = _student(COND_BOTH)
    pred = GradientPredictor(student, latent_dim=LATENT)
    _perturb_own(pred)
    x, u, y, z = _inputs(COND_BOTH)
    x.requires_grad_(True)
    z.requires_grad_(True)
    out, g = pred(x, u, y, z)
    assert not out.requires_grad  # the student output is a constant for the predictor's loss
    g.square().mean().backward()
    for name, p in student.named_parameters():
        assert p.grad is None, name
    assert x.grad is None  # nothing flows back through the shared trunk
    assert z.grad is not None and z.grad.abs().max() > 0  # ... but it does reach the encoder through z
    own = dict((n, p) for n, p in pred.named_parameters() if not n.startswith("student."))
    for name, p in own.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    nonzero = [n for n, p in own.items() if p.grad.abs().max() > 0]
    assert len(nonzero) == len(own), sorted(set(own) - set(nonzero))


def test_fresh_predictor_trains_from_the_head():
    # At init only the head can move (everything before it is multiplied by its zero weight); it must get gradient.
    pred = GradientPredictor(_student(TINY), latent_dim=LATENT)
    x, u, y, z = _inputs(TINY)
    _, g = pred(x, u, y, z)
    (g - 1.0).square().mean().backward()
    assert pred.out[-1].weight.grad.abs().max() > 0


def test_trunk_runs_once_per_forward():
    student = _student(TINY)
    pred = GradientPredictor(student, latent_dim=LATENT)
    calls = {"input_conv": 0, "middle": 0, "out": 0}
    hooks = [getattr(student, k).register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k in calls]
    try:
        pred(*_inputs(TINY))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"input_conv": 1, "middle": 1, "out": 1}


def test_student_frozen_and_kept_in_eval_mode():
    cfg = UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), norm_groups=4, dropout=0.5)
    student = _student(cfg)
    pred = GradientPredictor(student, latent_dim=LATENT).train()
    assert pred.training and pred.middle.training and not student.training
    assert not any(p.requires_grad for p in student.parameters())
    x, u, y, z = _inputs(cfg)
    out1, _ = pred(x, u, y, z)
    out2, _ = pred(x, u, y, z)
    assert torch.equal(out1, out2)  # no dropout in the corrected output


def test_trainable_parameters_exclude_student():
    student = _student(COND_BOTH)
    pred = GradientPredictor(student, latent_dim=LATENT)
    train_ids = {id(p) for p in pred.trainable_parameters()}
    student_ids = {id(p) for p in student.parameters()}
    assert train_ids and not (train_ids & student_ids)
    assert train_ids | student_ids == {id(p) for p in pred.parameters()}
    assert all(p.requires_grad for p in pred.trainable_parameters())
    # the z projection maps the latent to the student's embedding width
    assert pred.z_proj.weight.shape == (COND_BOTH.time_emb_channels, LATENT)


def _same_topology_pairs(pred: GradientPredictor):
    """(name, predictor tensor, student tensor) for every student middle/decoder tensor."""
    mine = pred.state_dict_own()
    theirs = {f"{k}": v for k, v in pred.student.state_dict().items() if k.startswith(("middle.", "decoder."))}
    return [(k, mine[k], v) for k, v in theirs.items()]


def test_init_from_student_copies_weights():
    student = _student(COND_BOTH)
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=True)
    pairs = _same_topology_pairs(pred)
    assert len(pairs) > 20
    for name, a, b in pairs:
        assert torch.equal(a, b), name
    # copies, not shared storage: training the predictor must not touch the student
    assert pred.middle[0].conv1.weight.data_ptr() != student.middle[0].conv1.weight.data_ptr()
    # the extra z modulations and the head are still zero
    for m in pred.modules():
        if isinstance(m, ZResBlock):
            assert torch.count_nonzero(m.z_emb_proj.weight) == 0
    assert torch.count_nonzero(pred.out[-1].weight) == 0


def test_fresh_init_does_not_copy():
    student = _student(COND_BOTH)
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=False)
    for name, a, b in _same_topology_pairs(pred):
        if name.endswith(("conv1.weight", "qkv.weight", "emb_proj.weight")):
            assert not torch.allclose(a, b), name
        if name.endswith(("conv2.weight", "proj.weight")) and "emb_proj" not in name:
            assert torch.count_nonzero(a) == 0, name  # PD's zero-init residual branches


def test_copied_predictor_with_student_head_reproduces_student():
    # Functional check that the copy has the student's topology and skip order: with the student's weights, zero
    # z-modulation and the student's output layer as head, G must be the student output itself.
    student = _student(TINY)
    pred = GradientPredictor(student, latent_dim=LATENT, init_from_student=True)
    pred.out.load_state_dict(student.out.state_dict())
    x, u, y, z = _inputs(TINY)
    out, g = pred(x, u, y, z)
    torch.testing.assert_close(g, out, rtol=0, atol=0)


def test_state_dict_own_round_trip():
    student = _student(COND_BOTH)
    a = GradientPredictor(student, latent_dim=LATENT)
    _perturb_own(a)
    sd = a.state_dict_own()
    assert sd and not any(k.startswith("student.") for k in sd)
    b = GradientPredictor(_student(COND_BOTH), latent_dim=LATENT)  # an equal student, separately built
    x, u, y, z = _inputs(COND_BOTH)
    assert not torch.allclose(a(x, u, y, z)[1], b(x, u, y, z)[1])
    b.load_state_dict_own(sd)
    assert torch.equal(a(x, u, y, z)[1], b(x, u, y, z)[1])
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict_own({k: v for k, v in sd.items() if not k.startswith("out.")})


def test_predictor_compatible():
    assert predictor_compatible(TINY) is None
    assert predictor_compatible(COND_BOTH) is None
    bad_out = UNetConfig(1, 3, 8, 8, (1, 2), 1, (4,), norm_groups=4)
    assert "output channels" in predictor_compatible(bad_out)
    bad_res = UNetConfig(1, 1, 12, 8, (1, 2), 1, (6,), norm_groups=4)
    assert "power-of-two" in predictor_compatible(bad_res)
    assert predictor_compatible(object()) is not None
    with pytest.raises(ValueError, match="output channels"):
        GradientPredictor(UNet(bad_out), latent_dim=LATENT)


# ------------------------------------------------------------------------------------------------ ZResBlock


def _resblock_by_hand(blk: ResBlock, x, emb, z_emb=None, z_lin=None, resample=None):
    def rs(t):
        if resample == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if resample == "down":
            return F.avg_pool2d(t, 2)
        return t

    h = blk.conv1(rs(F.silu(blk.norm1(x))))
    ts, tsh = blk.emb_proj(F.silu(emb)).chunk(2, dim=1)
    h = blk.norm2(h) * (1 + ts[:, :, None, None]) + tsh[:, :, None, None]
    if z_lin is not None:
        zs, zsh = z_lin(F.silu(z_emb)).chunk(2, dim=1)
        h = (1 + zs[:, :, None, None]) * h + zsh[:, :, None, None]
    h = blk.conv2(F.silu(h))
    skip = rs(x) if isinstance(blk.skip, torch.nn.Identity) else blk.skip(rs(x))
    return skip + h


@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_zresblock_matches_definition(resample):
    torch.manual_seed(0)
    blk = ZResBlock(8, 12, 16, groups=4, resample=resample)
    assert torch.count_nonzero(blk.z_emb_proj.weight) == 0 and torch.count_nonzero(blk.z_emb_proj.bias) == 0
    torch.nn.init.normal_(blk.conv2.weight, std=0.1)  # PyTorch's default init would do; make sure it is nonzero
    x, emb, z_emb = torch.randn(2, 8, 8, 8), torch.randn(2, 16), torch.randn(2, 16)
    # z-Linear at zero: exactly the time-only modulation (and the ResBlock with the same weights).
    ref = _resblock_by_hand(blk, x, emb, resample=resample)
    torch.testing.assert_close(blk(x, emb, z_emb), ref)
    plain = ResBlock(8, 12, 16, groups=4, dropout=0.0, resample=resample)
    plain.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("z_emb_proj.")})
    torch.testing.assert_close(blk(x, emb, z_emb), plain(x, emb))
    # nonzero z-Linear: the full double modulation
    torch.nn.init.normal_(blk.z_emb_proj.weight, std=0.3)
    torch.nn.init.normal_(blk.z_emb_proj.bias, std=0.3)
    full = _resblock_by_hand(blk, x, emb, z_emb, blk.z_emb_proj, resample=resample)
    torch.testing.assert_close(blk(x, emb, z_emb), full)
    assert not torch.allclose(full, ref)


# ------------------------------------------------------------------------------------------------ encoder


def test_encoder_default_tables():
    table = {8: ((64,), None), 16: ((64, 128), None), 32: ((64, 128, 128), 1), 64: ((64, 128, 128, 128), 2),
             128: ((64, 128, 256, 256, 256), 3)}
    for res, (channels, attn) in table.items():
        cfg = EncoderConfig.default_for(res, 3, 512)
        assert (cfg.channels, cfg.attention_after, cfg.latent_dim, cfg.in_channels) == (channels, attn, 512, 3)
        assert cfg.norm_groups == 32 and cfg.attention_heads == 4
        if attn is not None:
            assert cfg.attention_resolution == 16  # PDAE's encoder attends at 16×16
    with pytest.raises(ValueError, match="no default"):
        EncoderConfig.default_for(256, 3, 512)


@pytest.mark.parametrize(
    "cfg",
    [
        EncoderConfig.default_for(8, 1, 64),
        EncoderConfig.default_for(16, 1, 32),
        EncoderConfig.default_for(32, 3, 16),
        EncoderConfig(3, 64, (8, 8, 16, 16), 2, latent_dim=10, norm_groups=4, attention_heads=2),
    ],
    ids=["8", "16", "32", "64-small"],
)
def test_encoder_shapes(cfg):
    torch.manual_seed(0)
    enc = SemanticEncoder(cfg)
    seen = []
    if enc.attention is not None:
        enc.attention.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[1:])))
    x0 = torch.rand(2, cfg.in_channels, cfg.resolution, cfg.resolution) * 2 - 1
    z = enc(x0)
    assert z.shape == (2, cfg.latent_dim) and torch.isfinite(z).all()
    assert enc.fc.in_features == 4 * 4 * cfg.channels[-1]  # final map is 4×4
    if cfg.attention_after is None:
        assert enc.attention is None
    else:
        k = cfg.attention_after
        assert seen == [(cfg.channels[k - 1], cfg.resolution >> k, cfg.resolution >> k)]
    assert not torch.allclose(z[0], z[1])  # depends on the image
    with pytest.raises(ValueError, match="x0 of shape"):
        enc(x0[:, :, :-1])


def test_encoder_trains_end_to_end_with_predictor():
    pred = GradientPredictor(_student(TINY), latent_dim=LATENT)
    _perturb_own(pred)
    enc = SemanticEncoder(EncoderConfig(1, 8, (8,), None, latent_dim=LATENT, norm_groups=4))
    x, u, y, _ = _inputs(TINY)
    _, g = pred(x, u, y, enc(x))
    g.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in enc.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resolution=12, channels=(64, 64)), "power-of-two"),
        (dict(resolution=4, channels=(64,)), "power-of-two"),
        (dict(resolution=32, channels=(64, 128)), "3 stride-2 convs"),
        (dict(resolution=16, channels=(64, 100)), "norm_groups"),
        (dict(resolution=16, channels=(64, 128), attention_after=3), "attention_after"),
        (dict(resolution=16, channels=(64, 128), attention_after=0), "attention_after"),
        (dict(resolution=16, channels=(64, 96), attention_after=2, attention_heads=5, norm_groups=32), "heads"),
        (dict(resolution=16, channels=(64, 128), latent_dim=0), "latent_dim"),
        (dict(resolution=16, channels=()), "non-empty"),
    ],
)
def test_encoder_config_rejects_invalid(kwargs, match):
    args = dict(in_channels=3, attention_after=None) | kwargs
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**args)


def test_encoder_config_normalises_lists():
    a = EncoderConfig(3, 16, [64, 128], None)
    assert a == EncoderConfig(3, 16, (64, 128), None) and hash(a) == hash(EncoderConfig(3, 16, (64, 128), None))


# ------------------------------------------------------------------------------------------------ shift form plumbing (D15)


_STAGE_MODEL = {
    "in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None, "dropout": 0.0,
    "num_classes": None, "norm_groups": 4,
}


def _stage_workspace(root) -> dict:
    """A training split, a student and a teacher checkpoint, and the predictor stage's params (x0_direct)."""
    import numpy as np

    from fakes import write_split_arrays
    from sferd.nn.build import build_unet

    rng = np.random.default_rng(0)
    write_split_arrays(root / "results/data/train", rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8))
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        net = build_unet(_STAGE_MODEL)
        (root / f"results/{name}").mkdir(parents=True)
        torch.save({"state_dict": net.state_dict(), "config": {"model": _STAGE_MODEL}},
                   root / f"results/{name}/model.pt")
    return {
        "kind": "predictor", "seed": 0, "precision": "fp32",
        "dataset": {"id": "digits-8x8", "heldout_fraction": 0.2, "split_seed": 0, "random_flip": False},
        "student_steps": 1,
        "student": {"checkpoint": "results/student/model.pt", "model": _STAGE_MODEL},
        "teacher": {"checkpoint": "results/teacher/model.pt", "model": _STAGE_MODEL},
        "guidance": None, "parameterization": "x", "loss_weighting": "truncated_snr",
        "encoder": {"in_channels": 1, "resolution": 8, "channels": [32], "attention_after": None, "latent_dim": 4},
        "predictor": {"latent_dim": 4, "encoder_channels": [32], "init_from_student": True, "updates": 2,
                      "batch_size": 4, "lr": 1e-4, "ema_decay": 0.5, "grad_clip_norm": 1.0,
                      "shift_cutoff_fraction": 0.3, "shift_parameterization": "x0_direct"},
        "inputs": {"train": "results/data/train"},
        "outputs": {"dir": "results/x-predictor", "metrics": "results/metrics/x-predictor.json"},
    }


def _sferd_source(form: str) -> dict:
    from sferd.methods.latent_prior import LatentStats
    from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig

    mlp_config = {"latent_dim": 4, "width": 16, "num_layers": 2, "time_emb_dim": 8, "num_classes": None}
    torch.save({"mlp": LatentMLP(LatentMLPConfig(**mlp_config)).state_dict(), "mlp_config": mlp_config,
                "stats": LatentStats(mean=torch.zeros(4), std=torch.ones(4)).state_dict()}, "prior.pt")
    return {"kind": "sferd", "checkpoint": "results/student/model.pt", "model": _STAGE_MODEL, "parameterization": "x",
            "predictor": {"checkpoint": "results/x-predictor/predictor.pt", "latent_dim": 4, "init_from_student": True,
                          "shift_cutoff_fraction": 0.3, "shift_parameterization": form},
            "prior": {"checkpoint": "prior.pt", "sampling_steps": 2, "clip_noise": 1.0, "clip_x0": 1.0}}


def test_predictor_stage_records_its_shift_form_and_sampling_refuses_another(tmp_path, monkeypatch):
    """The form lives in predictor.pt (D15): the SFERD FID stage samples with the form training used, and a
    checkpoint trained with another form is refused with a StageError naming both, before any sampling."""
    from sferd.pipeline.stages import fid_sferd, predictor
    from sferd.util.errors import StageError

    monkeypatch.chdir(tmp_path)
    params = _stage_workspace(tmp_path)
    predictor.run("x-predictor", params)
    ckpt = torch.load(tmp_path / "results/x-predictor/predictor.pt", weights_only=True)
    assert ckpt["shift_parameterization"] == "x0_direct"
    assert ckpt["config"]["predictor"]["shift_parameterization"] == "x0_direct"

    from sferd.pipeline.stages.common import load_model

    student = load_model("results/student/model.pt", _STAGE_MODEL)
    sample = fid_sferd.make_sampler(_sferd_source("x0_direct"), student, 1)
    noise = torch.randn(2, 1, 8, 8)
    assert sample(noise, [0, 1], None).shape == (2, 1, 8, 8)
    for other in ("x0_tweedie", "v_direct"):
        with pytest.raises(StageError, match=rf"trained with shift_parameterization 'x0_direct'.*samples with '{other}'"):
            fid_sferd.make_sampler(_sferd_source(other), student, 1)


def test_a_checkpoint_older_than_the_shift_field_is_the_released_form(tmp_path, monkeypatch):
    """predictor.pt files written before D15 hold no form: they were trained with x0_tweedie, and only that is
    accepted for them."""
    from sferd.methods.sferd import trained_shift_parameterization
    from sferd.pipeline.stages import fid_sferd
    from sferd.pipeline.stages.common import load_model
    from sferd.util.errors import StageError

    monkeypatch.chdir(tmp_path)
    _stage_workspace(tmp_path)
    student = load_model("results/student/model.pt", _STAGE_MODEL)
    pred = GradientPredictor(student, latent_dim=4, init_from_student=True)
    legacy = {"predictor": pred.state_dict_own(),
              "config": {"student": {"checkpoint": "results/student/model.pt"},
                         "predictor": {"latent_dim": 4, "init_from_student": True}}}
    assert trained_shift_parameterization(legacy) == "x0_tweedie"
    (tmp_path / "results/x-predictor").mkdir(parents=True)
    torch.save(legacy, tmp_path / "results/x-predictor/predictor.pt")
    fid_sferd.make_sampler(_sferd_source("x0_tweedie"), student, 1)
    with pytest.raises(StageError, match="x0_tweedie"):
        fid_sferd.make_sampler(_sferd_source("x0_direct"), student, 1)
