"""The diffusion U-Net, with capture of the attention one self-attention block *receives*.

Sources
-------
* Architecture: the ``unet_iddpm`` network of progressive distillation (PD; Salimans & Ho, "Progressive
  Distillation for Fast Sampling of Diffusion Models", ICLR 2022; google-research ``diffusion_distillation``),
  itself the improved-DDPM U-Net: BigGAN-style residual blocks with scale/shift ("adaptive group norm")
  conditioning, resampling inside residual blocks, self-attention at chosen feature-map sizes, zero-initialised
  residual branches and output layer.
* Received attention: SFERD (Zhou et al., "Reducing Spatial Fitting Error in Distillation of Denoising Diffusion
  Models", AAAI 2024) guides distillation with the teacher's self-attention map. For one chosen attention block
  we return, per image, c_j = Σ_i mean_heads softmax(q_i·k_j/√d)  -- how much attention key token j receives
  from all queries. Every softmax row sums to one, so c has mean exactly 1 over the r² tokens.

Paper-scale configurations, for reference (PD Appendix / ``diffusion_distillation`` configs):

* CIFAR-10:    base 256, mult (1, 1, 1), 3 res-blocks, attention (16, 8), 1 head, dropout 0.2, out C (``x``).
* ImageNet 64: base 192, mult (1, 2, 3, 4), 3 res-blocks, attention (32, 16, 8), head_channels 64,
  dropout 0.1, 1000 classes, out 2C (``both``).
* Quickstart:  base 32, mult (1, 2), 1 res-block, attention (8,), 16×16 input, 1 channel, norm_groups 8.

Choices where the sources leave room (all deliberate, change them only together with the tests):

* Residual sum ``skip + h`` is *not* rescaled by 1/√2 (PD and improved-DDPM do not rescale; with
  zero-initialised residual branches the activations start out as the skip path anyway).
* GroupNorm epsilon 1e-6 (Flax's default, which PD's JAX code uses) rather than PyTorch's 1e-5.
* Weights use Flax's default initialiser (truncated-normal LeCun: variance 1/fan_in), biases zero, so a
  freshly built network has PD's initial statistics rather than PyTorch's smaller default scale.
* The class embedding "one-hot → Linear(num_classes, emb, bias=False)" is evaluated as a column lookup of that
  Linear's weight: the same function and gradient without materialising a (B, num_classes) one-hot matrix.
* The captured received attention is computed without gradient (it is a weight for the distillation loss,
  taken from a frozen teacher); keeping its graph would store the full N×N map and defeat the chunking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sferd.nn.dropout import SampleDropout, number_dropout_layers

BlockKey = tuple[str, int, int]  # (part, resolution, index among that part's attention blocks at that resolution)
PARTS: tuple[str, ...] = ("encoder", "middle", "decoder")

GROUPNORM_EPS = 1e-6
# The received-attention map of one query chunk is (B, heads, chunk, N) floats; cap it at 2^24 elements
# (64 MiB in float32) so that even ImageNet-64's 32×32 attention at a large batch never needs N×N at once.
CAPTURE_MAX_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    resolution: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    num_classes: int | None = None
    norm_groups: int = 32
    emb_channels: int | None = None

    def __post_init__(self) -> None:
        # Normalise list inputs (they arrive as lists from YAML/JSON) to tuples so the config stays hashable
        # and compares equal regardless of how it was written.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        self._validate()

    # -- derived quantities ------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, e.g. (32, 16, 8)."""
        return tuple(self.resolution >> level for level in range(self.num_levels))

    @property
    def time_emb_channels(self) -> int:
        return self.emb_channels if self.emb_channels is not None else 4 * self.base_channels

    def level_channels(self, level: int) -> int:
        return self.base_channels * self.channel_mult[level]

    def heads_for(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels is not None else self.num_heads

    def attention_blocks(self) -> list[BlockKey]:
        """Every attention block as (part, resolution, index), in execution order.

        The index counts the blocks of one part at one resolution, so ("decoder", 16, 3) is the fourth decoder
        attention block at 16×16. This mirrors exactly the loops in ``UNet.__init__`` (a test checks it), so a
        spec can be validated against it without building the network.
        """
        attn = set(self.attention_resolutions)
        blocks: list[BlockKey] = []
        for res in self.resolutions:
            if res in attn:
                blocks += [("encoder", res, i) for i in range(self.num_res_blocks)]
        blocks.append(("middle", self.resolutions[-1], 0))
        for res in reversed(self.resolutions):
            if res in attn:
                blocks += [("decoder", res, i) for i in range(self.num_res_blocks + 1)]
        return blocks

    def resolve_capture(self, target: tuple[str, int, str | int]) -> BlockKey:
        """Map (part, resolution, "first" | "last" | index) to the block key; ValueError if there is none."""
        available = self.attention_blocks()

        def fail(why: str) -> ValueError:
            listing = ", ".join(f"({p!r}, {r}, {i})" for p, r, i in available)
            return ValueError(
                f"invalid capture target {target!r}: {why}. Available attention blocks "
                f"(part, resolution, index; 'first'/'last' also accepted as index): {listing}"
            )

        if not isinstance(target, (tuple, list)) or len(target) != 3:
            raise fail("expected a 3-tuple (part, resolution, position)")
        part, res, pos = target
        if part not in PARTS:
            raise fail(f"part must be one of {PARTS}")
        if isinstance(res, bool) or not isinstance(res, int):
            raise fail("resolution must be an int")
        indices = [i for p, r, i in available if p == part and r == res]
        if not indices:
            raise fail(f"no {part} attention block at resolution {res}")
        if pos == "first":
            return (part, res, indices[0])
        if pos == "last":
            return (part, res, indices[-1])
        if isinstance(pos, bool) or not isinstance(pos, int) or pos not in indices:
            raise fail(f"position must be 'first', 'last' or an index in 0..{indices[-1]}")
        return (part, res, pos)

    # -- validation ----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        def positive(name: str, value: int | None) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("in_channels", "out_channels", "resolution", "base_channels", "num_res_blocks",
                     "num_heads", "norm_groups"):
            positive(name, getattr(self, name))
        for name in ("head_channels", "num_classes", "emb_channels"):
            positive(name, getattr(self, name))
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if self.resolution % (1 << (self.num_levels - 1)):
            raise ValueError(
                f"resolution {self.resolution} cannot be halved {self.num_levels - 1} times "
                f"(channel_mult has {self.num_levels} levels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unknown:
            # Silently ignoring these would build a network without the attention the spec asked for.
            raise ValueError(
                f"attention_resolutions {unknown} are not feature-map sizes of this network "
                f"(levels have sizes {list(self.resolutions)})"
            )
        # The decoder's GroupNorms see concatenations of these channel counts, which are then divisible too.
        for ch in sorted({self.base_channels, *(self.level_channels(lv) for lv in range(self.num_levels))}):
            if ch % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every channel count; {ch} is not divisible "
                    f"(base_channels={self.base_channels}, channel_mult={self.channel_mult})"
                )
        attn_levels = [lv for lv, r in enumerate(self.resolutions) if r in self.attention_resolutions]
        for ch in {self.level_channels(lv) for lv in attn_levels} | {self.level_channels(self.num_levels - 1)}:
            if self.head_channels is not None:
                if ch % self.head_channels:
                    raise ValueError(f"head_channels={self.head_channels} must divide attention channels {ch}")
            elif ch % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide attention channels {ch}")


# ------------------------------------------------------------------------------------------------ layers


def _flax_default_init_(module: nn.Module) -> None:
    """Truncated-normal LeCun init (Flax's default for Dense/Conv), zero biases -- see the module docstring."""
    weight = module.weight
    fan_in = weight[0].numel()  # in_features (Linear) or in_channels·kh·kw (Conv)
    # Flax divides by the std of a unit normal truncated to ±2 so that the *truncated* samples have
    # variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _zero_(module: nn.Module) -> nn.Module:
    # Zero-initialised residual branches make every block start as the identity (and the output layer start
    # at zero), which is what lets a deep U-Net train stably without normalisation of the residual sum.
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)


def timestep_embedding(u: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of ``1000 * u`` (PD scales its [0, 1] input to DDPM's 0..1000)."""
    half = dim // 2
    # Frequencies from 1 down to 1/max_period, geometrically spaced (the DDPM/PD formula uses half - 1).
    exponent = torch.arange(half, device=u.device, dtype=torch.float32) * (-math.log(max_period) / max(half - 1, 1))
    args = (1000.0 * u.to(torch.float32))[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


@torch.no_grad()
def received_attention(q: torch.Tensor, k: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """c_j = mean_heads Σ_i softmax_j(q_i·k_j/√d) for q, k of shape (B, heads, N, d); returns (B, N) float32.

    Queries are processed ``chunk_size`` at a time (default: as many as fit in CAPTURE_MAX_CHUNK_ELEMENTS), so the
    (B, heads, N, N) map is never held in full. Softmax rows are independent, so chunking over queries is exact.
    """
    b, heads, n, d = q.shape
    if chunk_size is None:
        chunk_size = max(1, CAPTURE_MAX_CHUNK_ELEMENTS // (b * heads * n))
    # float32 even under reduced-precision weights: c is summed over up to N rows and must have mean 1.
    q = q.float() * (d**-0.5)  # scaling q once is cheaper than scaling each (chunk × N) logit block
    kt = k.float().transpose(-1, -2)
    total = torch.zeros(b, heads, n, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk_size):
        logits = torch.matmul(q[:, :, start : start + chunk_size], kt)  # (B, heads, chunk, N)
        total += torch.softmax(logits, dim=-1).sum(dim=2)
    return total.mean(dim=1)


class ResBlock(nn.Module):
    """PD's residual block: GN → SiLU → (resample) → conv → adaptive GN → SiLU → dropout → zero-init conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        groups: int,
        dropout: float,
        resample: Literal["up", "down"] | None = None,
    ):
        super().__init__()
        self.resample = resample
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = _group_norm(groups, out_channels)
        # keyed per sample, so the mask does not depend on the batch split (sferd/nn/dropout.py);
        # nn.Identity instead of Dropout(0): no per-call dropout dispatch for students/teachers without dropout.
        self.dropout = SampleDropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        # Resampling sits after the first nonlinearity, on both paths, as in PD/BigGAN: the conv then runs at
        # the output resolution.
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        # norm(h)·(1 + scale) + shift in one fused op: addcmul(shift, norm(h), 1 + scale).
        h = torch.addcmul(shift, self.norm2(h), scale + 1.0)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """GN → 1×1 q,k,v → multi-head self-attention over the r² positions → zero-init 1×1 proj → residual."""

    def __init__(self, channels: int, heads: int, *, groups: int, key: BlockKey):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{heads} heads do not divide {channels} channels")
        self.heads = heads
        self.key = key  # (part, resolution, index): how capture targets refer to this block
        self.norm = _group_norm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, key={self.key}"

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape (B, heads, N, d) with N = H·W tokens in row-major order."""
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W); channel = (which, head, d)
        # One transposed copy to (B, 3, heads, N, d) gives q, k, v with unit stride along d, which the CPU
        # attention kernels want; splitting afterwards (unbind) is free.
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, hh * ww).transpose(-1, -2).contiguous()
        q, k, v = qkv.unbind(1)
        return q, k, v

    def forward(self, x: torch.Tensor, *, capture: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv_heads(x)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d); default scale 1/√d
        h = h.transpose(-1, -2).reshape(b, c, hh, ww)  # back to channel = (head, d)
        out = x + self.proj(h)
        return out, (received_attention(q, k) if capture else None)


class Stage(nn.ModuleList):
    """A run of ResBlocks/AttentionBlocks applied in order; its output is one skip activation (encoder) or the
    consumer of one (decoder, when ``takes_skip``).

    ``forward(h, emb, capture_key=None) -> (h, c)``: c is the received attention of the block whose key equals
    ``capture_key``, or None if that block is not in this stage.
    """

    def __init__(self, layers: list[nn.Module], *, takes_skip: bool = False):
        super().__init__(layers)
        self.takes_skip = takes_skip

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, capture_key: BlockKey | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        captured = None
        for layer in self:
            if isinstance(layer, AttentionBlock):
                h, c = layer(h, capture=layer.key == capture_key)
                if c is not None:
                    captured = c
            else:
                h = layer(h, emb)
        return h, captured


# ------------------------------------------------------------------------------------------------ network


class UNet(nn.Module):
    """PD's ``unet_iddpm`` U-Net: f(x, u, y) with u ∈ [0, 1] the PD time input arctan(e^{-λ/2})/(π/2).

    Pieces are kept separate for reuse (e.g. an encoder-based gradient predictor):
    ``forward = embed → encode → middle → decode``; ``input_conv`` + ``encoder`` (ModuleList of Stages, one
    skip each), ``middle`` (Stage), ``decoder`` (ModuleList of Stages), ``out`` (GN → SiLU → zero conv).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        base, emb_ch, groups = cfg.base_channels, cfg.time_emb_channels, cfg.norm_groups
        attn_res = set(cfg.attention_resolutions)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.class_embed = nn.Linear(cfg.num_classes, emb_ch, bias=False) if cfg.num_classes else None

        def res_block(cin: int, cout: int, resample: Literal["up", "down"] | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, groups=groups, dropout=cfg.dropout, resample=resample)

        def attn_block(ch: int, key: BlockKey) -> AttentionBlock:
            return AttentionBlock(ch, cfg.heads_for(ch), groups=groups, key=key)

        # Encoder: every stage's output is pushed as a skip (the input conv's output is the first skip).
        self.input_conv = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.encoder = nn.ModuleList()
        skip_channels = [base]
        ch = base
        for level, res in enumerate(cfg.resolutions):
            out_ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, out_ch)]
                ch = out_ch
                if res in attn_res:
                    layers.append(attn_block(ch, ("encoder", res, i)))
                self.encoder.append(Stage(layers))
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                self.encoder.append(Stage([res_block(ch, ch, "down")]))
                skip_channels.append(ch)

        bottom = cfg.resolutions[-1]
        self.middle = Stage([res_block(ch, ch), attn_block(ch, ("middle", bottom, 0)), res_block(ch, ch)])

        # Decoder: num_res_blocks + 1 stages per level, each concatenating one popped skip.
        self.decoder = nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            res = cfg.resolutions[level]
            out_ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), out_ch)]
                ch = out_ch
                if res in attn_res:
                    layers.append(attn_block(ch, ("decoder", res, i)))
                self.decoder.append(Stage(layers, takes_skip=True))
            if level != 0:
                self.decoder.append(Stage([res_block(ch, ch, "up")]))
        assert not skip_channels, "every skip must be consumed exactly once"

        self.out = nn.Sequential(_group_norm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _flax_default_init_(module)
        for module in self.modules():
            if isinstance(module, ResBlock):
                _zero_(module.conv2)
            elif isinstance(module, AttentionBlock):
                _zero_(module.proj)
        _zero_(self.out[-1])
        number_dropout_layers(self)

    # -- pieces ----------------------------------------------------------------------------------------

    def attention_modules(self) -> list[AttentionBlock]:
        """The AttentionBlocks in execution order (registration order equals execution order)."""
        return [m for m in self.modules() if isinstance(m, AttentionBlock)]

    def embed(self, u: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Time (and class) embedding, shape (B, emb_channels). ``u`` may be (B,) or a scalar."""
        if self.class_embed is not None and y is None:
            raise ValueError(f"this U-Net is class-conditional ({self.config.num_classes} classes): pass labels y")
        if self.class_embed is None and y is not None:
            raise ValueError("this U-Net is unconditional (num_classes is None) but labels y were passed")
        u = torch.as_tensor(u, device=self.input_conv.weight.device)
        if u.ndim == 0:
            u = u.reshape(1)
        emb = self.time_embed(timestep_embedding(u, self.config.base_channels).to(self.input_conv.weight.dtype))
        if self.class_embed is not None:
            # == Linear(one_hot(y)) without building the one-hot matrix (see the module docstring).
            emb = emb + self.class_embed.weight.t()[y]
        return emb

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input conv + encoder. Returns (h, skips) with h = skips[-1], the input of the middle stage."""
        h, skips, _ = self._encode(x, emb, None)
        return h, skips

    def decode(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        capture: tuple[str, int, str | int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder + output layer, consuming ``skips`` (the list is not modified). ``capture`` may only target a
        decoder block here (encoder/middle targets are captured by ``forward``)."""
        key = self.config.resolve_capture(capture) if capture is not None else None
        if key is not None and key[0] != "decoder":
            raise ValueError(f"decode() can only capture decoder attention blocks, got {capture!r}")
        return self._decode(h, skips, emb, key)

    def _encode(
        self, x: torch.Tensor, emb: torch.Tensor, key: BlockKey | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        h = self.input_conv(x)
        skips = [h]
        captured = None
        for stage in self.encoder:
            h, c = stage(h, emb, key)
            if c is not None:
                captured = c
            skips.append(h)
        return h, skips, captured

    def _decode(
        self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, key: BlockKey | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        remaining = list(skips)  # a copy of the references: the caller's list stays intact
        captured = None
        for stage in self.decoder:
            if stage.takes_skip:
                h = torch.cat([h, remaining.pop()], dim=1)
            h, c = stage(h, emb, key)
            if c is not None:
                captured = c
        if remaining:
            raise ValueError(f"{len(remaining)} skip activations were not consumed: wrong skips for this U-Net")
        return self.out(h), captured

    # -- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        capture: tuple[str, int, str | int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Network output (B, out_channels, R, R); with ``capture``, also the received attention c (B, r²)."""
        cfg = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.resolution, cfg.resolution):
            raise ValueError(
                f"expected x of shape (B, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}), "
                f"got {tuple(x.shape)}"
            )
        key = cfg.resolve_capture(capture) if capture is not None else None
        emb = self.embed(u, y)
        if emb.shape[0] == 1 and x.shape[0] != 1:
            emb = emb.expand(x.shape[0], -1)  # a scalar u shared by the whole batch
        elif emb.shape[0] != x.shape[0]:
            raise ValueError(f"u has batch size {emb.shape[0]}, x has {x.shape[0]}")
        h, skips, c_enc = self._encode(x, emb, key)
        h, c_mid = self.middle(h, emb, key)
        out, c_dec = self._decode(h, skips, emb, key)
        if key is None:
            return out
        captured = c_enc if key[0] == "encoder" else c_mid if key[0] == "middle" else c_dec
        assert captured is not None, f"capture target {key} was resolved but no block produced it"
        return out, captured


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen (a frozen teacher still has its size)."""
    return sum(p.numel() for p in model.parameters())
