"""scikit-learn's digits as the quickstart's real, offline dataset.

load_digits ships inside the scikit-learn wheel (1797 grayscale 8×8 images, 17 grey levels, 10 classes),
so the quickstart needs no network. Images are scaled to [0, 1], optionally upsampled bilinearly to 16 or
32 px (attention and blur need some spatial extent), and stored as uint8 like any other image dataset.
"""

from __future__ import annotations

import numpy as np

from sferd.util.errors import StageError


def load_digits_uint8(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N×R×R×1 uint8, labels N int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise StageError("scikit-learn is not installed; `pip install -e .` installs it") from e
    try:
        bunch = load_digits()
    except (OSError, FileNotFoundError) as e:
        raise StageError(
            f"scikit-learn's embedded digits data could not be read ({e}); reinstall scikit-learn "
            "(`pip install --force-reinstall scikit-learn`)"
        ) from e
    x = bunch.images.astype(np.float32) / 16.0  # 0..16 grey levels → [0, 1]
    if resolution != 8:
        import torch
        import torch.nn.functional as F

        if resolution % 8:
            raise StageError(f"digits resolution must be a multiple of 8, got {resolution}")
        t = torch.from_numpy(x)[:, None]
        x = F.interpolate(t, size=(resolution, resolution), mode="bilinear", align_corners=False)[:, 0].numpy()
    images = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def stratified_split(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, heldout), the same fraction of every class held out, sorted for determinism."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(heldout_fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
