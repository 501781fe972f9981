"""Dropout whose mask is a function of (sample key, layer, element), not of a global RNG stream.

With torch's dropout the mask of sample g depends on how many elements were drawn before it — on the batch
split, so on the number of processes and the micro-batch size. Here the training loop gives every sample a key
drawn from the sample's own generator (sferd.methods.draws), and each element's keep/drop decision is a hash of
(key, the layer's salt, the element's index). The hash is integer arithmetic, bit-exact on every device, so a
1-process and an 8-process run drop the same activations.

The hash is a 32-bit integer mixer evaluated in int64 (every product stays below 2**63, so no overflow on any
backend); its top 24 bits give an exact float32 uniform in [0, 1). Cost: a few element-wise integer ops per
activation, only in training and only where dropout > 0 (teachers; students and the quickstart have none).
Outside a `sample_keys` block (unit tests, ad-hoc use) it falls back to torch's dropout.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_KEYS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sferd_dropout_keys", default=None)
_M32 = 0xFFFFFFFF


@contextmanager
def sample_keys(keys: torch.Tensor | None) -> Iterator[None]:
    """Per-sample dropout keys ((B,) int64 in [0, 2**31)) for the forward passes inside the block."""
    token = _KEYS.set(keys)
    try:
        yield
    finally:
        _KEYS.reset(token)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # constants below 2**31: x < 2**32 times c < 2**31 stays below 2**63 in int64
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def keyed_uniform(keys: torch.Tensor, salt: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 uniforms in [0, 1), element e of sample b a pure function of (keys[b], salt, e)."""
    n = 1
    for s in shape:
        n *= int(s)
    idx = torch.arange(n, device=keys.device, dtype=torch.int64)
    k = _mix32((keys.to(torch.int64) & 0x7FFFFFFF) * 0x2545F491 + (salt & 0xFFFF) * 0x9E3779B1 & _M32)
    x = _mix32((k[:, None] ^ idx[None, :]) & _M32)
    x = _mix32(x ^ (k[:, None] >> 7))
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(keys.shape[0], *shape)


class SampleDropout(nn.Module):
    """Inverted dropout with per-sample keyed masks (see module docstring). `salt` tells layers apart; the network
    that owns the layers numbers them (`number_dropout_layers`)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.salt = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keys = _KEYS.get()
        if keys is None:
            return F.dropout(x, self.p, True)
        if keys.shape[0] != x.shape[0]:
            raise ValueError(f"{keys.shape[0]} dropout keys for a batch of {x.shape[0]}")
        keep = keyed_uniform(keys.to(x.device), self.salt, x.shape[1:]) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def number_dropout_layers(module: nn.Module) -> None:
    """Give every SampleDropout in `module` a distinct salt, in module order (deterministic for one architecture)."""
    for i, m in enumerate(m for m in module.modules() if isinstance(m, SampleDropout)):
        m.salt = i
