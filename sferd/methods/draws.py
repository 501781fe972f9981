"""Random numbers of a training batch, drawn per *global sample* so they do not depend on how the batch is split.

A 1-process run and an 8-process run (or a run with gradient accumulation) must train on the same data with the
same noise: update u of a stage with global batch B trains samples u·B … u·B + B − 1, and sample g draws
everything it needs — which training image, the flip, the time step, the noise, the dropout key — from its own
generator seeded from (stage seed, stream, g). Whichever rank or micro-batch sample g lands on, its numbers are the
same, and a resumed run needs no saved RNG state: the update count is enough.

The generators are CPU Mersenne twisters (the numbers are then the same on every device); the results are moved
to the training device. Seeding one generator costs a few microseconds, negligible next to a training step.

Every loss in the suite takes a `Draws`: `SampleDraws` in training, `GeneratorDraws` (one generator for the whole
batch) in unit tests and benchmarks that only need *some* reproducible numbers.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers that spreads every input bit over the output."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(seed: int, stream: int, index: int) -> int:
    """The generator seed of global sample `index` in `stream` of a stage seeded with `seed` (63 bits, so every
    torch generator accepts it). Chained rather than summed: (seed, index) pairs cannot collide by arithmetic."""
    return _mix64(_mix64(_mix64(seed) ^ (stream & _M64)) ^ (index & _M64)) >> 1


class Draws(Protocol):
    """Per-sample random numbers for a batch of `batch_size` samples, returned on `device`."""

    batch_size: int
    device: torch.device

    def rand(self) -> torch.Tensor: ...  # (B,) float32 in [0, 1)

    def randint(self, low: int, high: int) -> torch.Tensor: ...  # (B,) int64 in [low, high)

    def randn(self, *shape: int) -> torch.Tensor: ...  # (B, *shape) float32 standard normal


class SampleDraws:
    """One generator per sample, seeded by `sample_seed(seed, stream, g)` for each global index g of the batch."""

    def __init__(self, seed: int, stream: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.indices = [int(g) for g in indices]
        self.batch_size = len(self.indices)
        self.device = torch.device(device)
        self._gens = [torch.Generator().manual_seed(sample_seed(seed, stream, g)) for g in self.indices]

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def rand(self) -> torch.Tensor:
        return self._out(torch.stack([torch.rand((), generator=g) for g in self._gens]))

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._out(torch.stack([torch.randint(low, high, (), generator=g) for g in self._gens]))

    def randn(self, *shape: int) -> torch.Tensor:
        out = torch.empty((self.batch_size, *shape))
        for row, g in zip(out, self._gens):
            torch.randn(shape, generator=g, out=row)
        return self._out(out)


class GeneratorDraws:
    """Batch-wise draws from one generator: reproducible, but tied to the batch (tests, benchmarks)."""

    def __init__(self, generator: torch.Generator, batch_size: int, device: torch.device | str | None = None):
        self.generator, self.batch_size = generator, batch_size
        self.device = torch.device(device) if device is not None else generator.device

    def rand(self) -> torch.Tensor:
        return torch.rand(self.batch_size, generator=self.generator, device=self.generator.device).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (self.batch_size,), generator=self.generator,
                             device=self.generator.device).to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.batch_size, *shape), generator=self.generator,
                           device=self.generator.device).to(self.device)
