"""uint8 image arrays ↔ model tensors, and the training-batch sampler every training stage uses."""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """N×H×W×C uint8 → N×C×H×W float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class BatchSampler:
    """Random batches with horizontal flips, from a seeded generator (resumable via get/set_state).

    Flips follow PD's data pipeline; on digits they are off (a flipped digit is another glyph) — the caller
    decides with `flip`.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *, seed: int, flip: bool):
        self.data, self.labels, self.batch_size, self.flip = data, labels, batch_size, flip
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=self.generator)
        x = self.data[idx]
        if self.flip:
            mask = torch.rand(self.batch_size, generator=self.generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x, (self.labels[idx] if self.labels is not None else None)
