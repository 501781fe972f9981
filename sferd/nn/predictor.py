"""SFERD's semantic encoder E and gradient predictor G (sferd-method.md §7).

The distilled student's x₀ prediction is shifted by a learned gradient of log p(z | x_t):

    x̂₀^S = x̂₀^θ(x_t, t, y) + c_t · G(x_t, z, t, y),   z = E(x₀),

with c_t fixed by the spec's shift parameterisation and applied by the caller (sferd.methods.sferd; D15): σ_t²/α_t
in the released form, 1 or σ_t in the well-conditioned ones. The network is the same for every form.

Sources
-------
* SFERD (Zhou et al., AAAI 2024) takes E and G from PDAE (Zhang et al., "Unsupervised Representation Learning from
  Pre-trained Diffusion Probabilistic Models", NeurIPS 2022): E is a small stride-2 conv net mapping the clean
  image to a code z; G is PDAE's "shift U-Net", which reuses the frozen diffusion model's embedding and encoder
  half and owns a middle block + decoder whose residual blocks are modulated by both the time (+class) embedding
  and z.

Choices where the sources leave room (deliberate; change them only together with tests/test_predictor.py):

* The shared trunk (embedding, input conv, encoder half, skips) runs once under ``torch.no_grad()`` and feeds both
  the student's own middle/decoder (→ the plain student output) and the predictor's copy (→ G). G never
  back-propagates into the trunk: the student is frozen, and not building that graph saves its activations.
* The predictor's middle block starts from the *encoder* output, not from the student's middle output: it is a
  second decoder path over the same features (PDAE), not a refinement of the student's decoder.
* G has ``in_channels`` channels even for a ``both`` student (2C outputs): G lives in x₀ space.
* The predictor's blocks use no dropout (the brief's dropout(0)); the frozen student is kept in eval mode even
  when the predictor is put in train mode, so its output (the quantity G corrects) is deterministic.
* Initialisation follows PD: Flax-default Linear/Conv, zero residual-branch convs and attention projections. In
  addition every block's z-Linear and the output head are zero, so a fresh predictor has G ≡ 0 and the shifted
  student *is* the student; training then grows G from there (the head receives gradient at step one).
* The encoder uses the same initialiser (and a zero-initialised attention projection, as in the U-Net) so the
  whole project has one set of initial statistics; GroupNorm epsilon is the U-Net's 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sferd.nn.unet import (
    AttentionBlock,
    ResBlock,
    Stage,
    UNet,
    UNetConfig,
    _flax_default_init_,
    _group_norm,
    _zero_,
)

# The encoder's final feature map is ENCODER_FINAL_RES × ENCODER_FINAL_RES (PDAE): depth = log2(resolution / 4).
ENCODER_FINAL_RES = 4

# Default encoder per input resolution: (channels of the stride-2 convs, 1-based conv after which attention sits).
# 32/64/128 are PDAE's; 8 and 16 are this project's choices for the digits quickstart (too small for a 16×16 map).
_DEFAULT_ENCODERS: dict[int, tuple[tuple[int, ...], int | None]] = {
    8: ((64,), None),
    16: ((64, 128), None),
    32: ((64, 128, 128), 1),
    64: ((64, 128, 128, 128), 2),
    128: ((64, 128, 256, 256, 256), 3),
}


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# ------------------------------------------------------------------------------------------------ encoder


@dataclass(frozen=True)
class EncoderConfig:
    """Semantic encoder: ``len(channels)`` stride-2 3×3 convs down to 4×4, optional attention, Linear to z."""

    in_channels: int
    resolution: int
    channels: tuple[int, ...]
    attention_after: int | None  # 1-based index of the conv whose output map gets self-attention; None: none
    latent_dim: int = 512
    norm_groups: int = 32
    attention_heads: int = 4

    def __post_init__(self) -> None:
        # YAML/JSON deliver lists; a tuple keeps the config hashable and equal however it was written.
        object.__setattr__(self, "channels", tuple(self.channels))
        self._validate()

    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def attention_resolution(self) -> int | None:
        """Size of the feature map the attention block sees (each conv halves the map)."""
        return None if self.attention_after is None else self.resolution >> self.attention_after

    @staticmethod
    def default_for(resolution: int, in_channels: int, latent_dim: int, *, norm_groups: int = 32) -> EncoderConfig:
        if resolution not in _DEFAULT_ENCODERS:
            raise ValueError(
                f"no default semantic encoder for {resolution}×{resolution} images (defaults exist for "
                f"{sorted(_DEFAULT_ENCODERS)}); give the encoder channels explicitly"
            )
        channels, attention_after = _DEFAULT_ENCODERS[resolution]
        return EncoderConfig(in_channels, resolution, channels, attention_after, latent_dim=latent_dim,
                             norm_groups=norm_groups)

    def _validate(self) -> None:
        for name in ("in_channels", "latent_dim", "norm_groups", "attention_heads"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"encoder {name} must be a positive int, got {getattr(self, name)!r}")
        res = self.resolution
        if not _is_pos_int(res) or res < 2 * ENCODER_FINAL_RES or res & (res - 1):
            raise ValueError(f"the semantic encoder needs a power-of-two resolution >= 8, got {res!r}")
        if not self.channels or not all(_is_pos_int(c) for c in self.channels):
            raise ValueError(f"encoder channels must be a non-empty tuple of positive ints, got {self.channels!r}")
        depth = int(math.log2(res // ENCODER_FINAL_RES))
        if len(self.channels) != depth:
            raise ValueError(
                f"{res}×{res} images need log2({res}/{ENCODER_FINAL_RES}) = {depth} stride-2 convs to reach "
                f"{ENCODER_FINAL_RES}×{ENCODER_FINAL_RES}, got {len(self.channels)} channel entries "
                f"{list(self.channels)}"
            )
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"encoder channels {c} not divisible by norm_groups={self.norm_groups}")
        if self.attention_after is not None:
            k = self.attention_after
            if not _is_pos_int(k) or k > depth:
                raise ValueError(f"attention_after must be None or a conv index in 1..{depth}, got {k!r}")
            ch = self.channels[k - 1]
            if ch % self.attention_heads:
                raise ValueError(
                    f"{self.attention_heads} attention heads do not divide the {ch} channels after conv {k}"
                )


class SemanticEncoder(nn.Module):
    """E(x₀) → z ∈ ℝ^latent_dim: [conv s2 → (attention) → GN → SiLU] × depth → flatten(4·4·C) → Linear."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.convs = nn.ModuleList()
        # One GroupNorm per conv output: the ones between convs and the final one before flattening.
        self.norms = nn.ModuleList()
        self.attention: AttentionBlock | None = None
        prev = cfg.in_channels
        for k, ch in enumerate(cfg.channels, start=1):
            self.convs.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            self.norms.append(_group_norm(cfg.norm_groups, ch))
            if k == cfg.attention_after:
                # The key is only a label (nothing captures the encoder's attention).
                self.attention = AttentionBlock(ch, cfg.attention_heads, groups=cfg.norm_groups,
                                                key=("encoder", cfg.resolution >> k, 0))
            prev = ch
        self.fc = nn.Linear(ENCODER_FINAL_RES * ENCODER_FINAL_RES * prev, cfg.latent_dim)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _flax_default_init_(m)
        if self.attention is not None:
            _zero_(self.attention.proj)  # attention starts as the identity, as everywhere in the U-Net

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x0.ndim != 4 or tuple(x0.shape[1:]) != (cfg.in_channels, cfg.resolution, cfg.resolution):
            raise ValueError(
                f"expected x0 of shape (B, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}), "
                f"got {tuple(x0.shape)}"
            )
        h = x0
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms), start=1):
            h = conv(h)
            if k == cfg.attention_after:
                h, _ = self.attention(h)
            h = F.silu(norm(h))
        return self.fc(h.flatten(1))


# ------------------------------------------------------------------------------------------------ predictor


class ZResBlock(ResBlock):
    """PD's ResBlock with a second, semantic modulation after the time/class one (PDAE's shift blocks):

        h ← (1 + z_scale)·(GN(h)·(1 + t_scale) + t_shift) + z_shift,
        (t_scale, t_shift) = emb_proj(SiLU(emb)),  (z_scale, z_shift) = z_emb_proj(SiLU(z_emb)).

    Subclassing keeps the parameter names of ResBlock, so a student block's weights load into it directly and only
    ``z_emb_proj`` is new. ``z_emb_proj`` starts at zero: a fresh block ignores z and equals the time-only block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        groups: int,
        dropout: float = 0.0,
        resample: Literal["up", "down"] | None = None,
    ):
        super().__init__(in_channels, out_channels, emb_channels, groups=groups, dropout=dropout, resample=resample)
        self.z_emb_proj = _zero_(nn.Linear(emb_channels, 2 * out_channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, z_emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        t_scale, t_shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        z_scale, z_shift = self.z_emb_proj(F.silu(z_emb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(t_shift, self.norm2(h), t_scale + 1.0)
        h = torch.addcmul(z_shift, h, z_scale + 1.0)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class ZStage(nn.ModuleList):
    """The predictor's counterpart of ``Stage``: the same layers in the same order, ResBlocks as ZResBlocks.

    A separate class (rather than ``Stage``) because its residual blocks take two embeddings.
    """

    def __init__(self, layers: list[nn.Module], *, takes_skip: bool = False):
        super().__init__(layers)
        self.takes_skip = takes_skip

    def forward(self, h: torch.Tensor, emb: torch.Tensor, z_emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, AttentionBlock):
                h, _ = layer(h)
            else:
                h = layer(h, emb, z_emb)
        return h


def _z_copy(stage: Stage, emb_channels: int) -> ZStage:
    """A freshly initialised ZStage with ``stage``'s topology, read off the built modules (not re-derived from the
    config), so the copy cannot drift from the U-Net's construction loops."""
    layers: list[nn.Module] = []
    for layer in stage:
        if isinstance(layer, ResBlock):
            layers.append(ZResBlock(
                layer.norm1.num_channels, layer.conv1.out_channels, emb_channels, groups=layer.norm1.num_groups,
                dropout=0.0, resample=layer.resample,
            ))
        elif isinstance(layer, AttentionBlock):
            layers.append(AttentionBlock(layer.norm.num_channels, layer.heads, groups=layer.norm.num_groups,
                                         key=layer.key))
        else:  # pragma: no cover - the U-Net only builds these two kinds
            raise TypeError(f"unexpected layer {type(layer).__name__} in a U-Net stage")
    return ZStage(layers, takes_skip=stage.takes_skip)


def predictor_compatible(student_config: UNetConfig) -> str | None:
    """None if a gradient predictor (and its semantic encoder) can be built for this student, else why not."""
    if not isinstance(student_config, UNetConfig):
        return (f"the gradient predictor reuses a U-Net's embedding and encoder half; a "
                f"{type(student_config).__name__} has none")
    c_in, c_out = student_config.in_channels, student_config.out_channels
    if c_out not in (c_in, 2 * c_in):
        # G is added to the student's x₀ prediction, which only x/eps/v (C) or `both` (2C) outputs define.
        return (f"the student has {c_out} output channels for {c_in} input channels; the predictor needs "
                f"{c_in} (x, eps or v) or {2 * c_in} (both) to shift its x₀ prediction")
    res = student_config.resolution
    if res < 2 * ENCODER_FINAL_RES or res & (res - 1):
        # E sees the same images as the student and halves them down to 4×4.
        return f"the semantic encoder needs a power-of-two resolution >= 8, the student runs at {res}×{res}"
    return None


class GradientPredictor(nn.Module):
    """G(x_t, z, t, y) around a frozen student U-Net; one forward returns (student output, G).

    Submodules: ``student`` (frozen, shared trunk + its own middle/decoder), and the predictor's own ``z_proj``
    (latent → embedding width), ``middle`` and ``decoder`` (ZStage copies of the student's) and ``out`` (head).
    """

    OWN_MODULES: tuple[str, ...] = ("z_proj", "middle", "decoder", "out")

    def __init__(self, student: UNet, *, latent_dim: int, init_from_student: bool = False):
        super().__init__()
        if not isinstance(student, UNet):
            raise TypeError(f"the gradient predictor needs a UNet student, got {type(student).__name__}")
        reason = predictor_compatible(student.config)
        if reason is not None:
            raise ValueError(f"cannot build a gradient predictor for this student: {reason}")
        if not _is_pos_int(latent_dim):
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        cfg = student.config
        emb_ch = cfg.time_emb_channels
        self.latent_dim = latent_dim
        self.init_from_student = init_from_student

        # Registered (so .to()/.cuda() move it with the predictor) but frozen and always in eval mode.
        self.student = student
        student.requires_grad_(False)
        student.eval()

        self.z_proj = nn.Linear(latent_dim, emb_ch)
        self.middle = _z_copy(student.middle, emb_ch)
        self.decoder = nn.ModuleList(_z_copy(stage, emb_ch) for stage in student.decoder)
        head_ch = student.out[0].num_channels
        self.out = nn.Sequential(_group_norm(cfg.norm_groups, head_ch), nn.SiLU(),
                                 nn.Conv2d(head_ch, cfg.in_channels, 3, padding=1))

        for module in self._own_modules():
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    _flax_default_init_(m)
        for module in self._own_modules():
            for m in module.modules():
                if isinstance(m, ZResBlock):
                    _zero_(m.conv2)
                    _zero_(m.z_emb_proj)
                elif isinstance(m, AttentionBlock):
                    _zero_(m.proj)
        if init_from_student:
            self._copy_from_student()
        _zero_(self.out[-1])  # G ≡ 0 at init in both modes

        ref = next(student.parameters())
        for module in self._own_modules():
            module.to(device=ref.device, dtype=ref.dtype)

    def _copy_from_student(self) -> None:
        for name in ("middle", "decoder"):
            mine, theirs = getattr(self, name), getattr(self.student, name)
            result = mine.load_state_dict(theirs.state_dict(), strict=False)
            # Same topology: the only names the student lacks are the per-block z modulations (kept at zero).
            bad_missing = [k for k in result.missing_keys if ".z_emb_proj." not in k]
            if bad_missing or result.unexpected_keys:
                raise RuntimeError(
                    f"predictor {name} does not mirror the student's: missing {bad_missing}, "
                    f"unexpected {result.unexpected_keys}"
                )

    def _own_modules(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.OWN_MODULES]

    # -- what is trained and saved -----------------------------------------------------------------------

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The predictor's own parameters (z_proj, middle/decoder copies, head); never the student's."""
        for module in self._own_modules():
            yield from module.parameters()

    def state_dict_own(self) -> dict[str, torch.Tensor]:
        """The predictor's own tensors, keyed as in ``state_dict()`` (the student is checkpointed elsewhere)."""
        sd: dict[str, torch.Tensor] = {}
        for name in self.OWN_MODULES:
            sd.update(getattr(self, name).state_dict(prefix=f"{name}."))
        return sd

    def load_state_dict_own(self, sd: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict_own())
        given = set(sd)
        if given != expected:
            raise ValueError(
                f"predictor state does not match this predictor: missing {sorted(expected - given)}, "
                f"unexpected {sorted(given - expected)}"
            )
        for name in self.OWN_MODULES:
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    def train(self, mode: bool = True) -> GradientPredictor:
        # Training the predictor must not switch the frozen student to train mode (dropout would make the
        # output being corrected random).
        super().train(mode)
        self.student.eval()
        return self

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self, x_t: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student output (B, out_channels, R, R), G (B, in_channels, R, R)) from one trunk evaluation."""
        student = self.student
        cfg = student.config
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (cfg.in_channels, cfg.resolution, cfg.resolution):
            raise ValueError(
                f"expected x_t of shape (B, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}), "
                f"got {tuple(x_t.shape)}"
            )
        b = x_t.shape[0]
        if z.ndim != 2 or tuple(z.shape) != (b, self.latent_dim):
            raise ValueError(f"expected z of shape ({b}, {self.latent_dim}), got {tuple(z.shape)}")

        with torch.no_grad():
            emb = student.embed(u, y)
            if emb.shape[0] == 1 and b != 1:
                emb = emb.expand(b, -1)  # a scalar u shared by the whole batch, as in UNet.forward
            elif emb.shape[0] != b:
                raise ValueError(f"u has batch size {emb.shape[0]}, x_t has {b}")
            h_enc, skips = student.encode(x_t, emb)
            h_mid, _ = student.middle(h_enc, emb)
            student_out, _ = student._decode(h_mid, skips, emb, None)

        z_emb = self.z_proj(z)
        h = self.middle(h_enc, emb, z_emb)
        remaining = list(skips)
        for stage in self.decoder:
            if stage.takes_skip:
                h = torch.cat([h, remaining.pop()], dim=1)
            h = stage(h, emb, z_emb)
        assert not remaining, "the decoder copy consumes every skip, like the student's"
        return student_out, self.out(h)
