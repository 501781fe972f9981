"""uint8 image batches → model tensors on the device (batches come from `sferd.data.store.ImageSplit.gather`)."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def to_model_range(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """N×H×W×C uint8 (array or tensor) → N×C×H×W float32 in [-1, 1], on `device` (default: where it is; the CPU
    for an array).

    The uint8 batch moves first and becomes float there: a quarter of the bytes cross to the GPU and the float copy
    exists only on the device. Batches come from `ImageSplit.gather`; a whole in-memory array still works (the
    conversion is the same, value for value). Anything but uint8 is refused: a float array could be in [0, 1],
    [-1, 1] or [0, 255], and guessing wrong trains on plausible-looking garbage.
    """
    if isinstance(images, torch.Tensor):
        x = images
    else:
        arr = np.ascontiguousarray(images)
        with warnings.catch_warnings():
            # a read-only memory map: the uint8 tensor is only read (the float conversion below makes the copy)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(arr)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range needs uint8 images (0..255), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"to_model_range needs N×H×W×C images, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=x.device.type == "cpu" and x.is_pinned())
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
