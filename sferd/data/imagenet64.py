"""ImageNet 64×64 from the official downsampled npz files (Chrabaszcz, Loshchilov & Hutter 2017).

The "Imagenet64_train_npz" / "Imagenet64_val_npz" downloads hold `train_data_batch_1.npz` …
`train_data_batch_10.npz` and `val_data.npz`. Each has `data`: N × 12288 uint8, the three colour planes one
after the other (R, G, B, each 64×64 row-major), and `labels`: N class numbers 1…1000. Labels are kept (D6:
the paper-scale ImageNet models are class-conditional) and shifted to 0…999.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sferd.util.errors import StageError

SITE = "https://image-net.org/download-images.php (Downsampled ImageNet 64x64, npz format)"
TRAIN_FILES = tuple(f"train_data_batch_{k}.npz" for k in range(1, 11))
VAL_FILE = "val_data.npz"
SIDE = 64


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            data, labels = f["data"], f["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{path} is not a downsampled-ImageNet npz file with `data` and `labels` ({e}); re-download it from {SITE}") from None
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or data.dtype != np.uint8:
        raise StageError(f"{path}: `data` is {data.dtype} {data.shape}, expected uint8 N×{3 * SIDE * SIDE} (the 64×64 files)")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise StageError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise StageError(f"{path}: labels must be 1…1000, found {labels.min()}…{labels.max()}")
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planar RGB → N×H×W×C
    return np.ascontiguousarray(images), labels - 1


def load_imagenet64(data_dir: str | Path, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images N×64×64×3 uint8, labels N int64 in 0…999) of the training batches or the validation file."""
    root = Path(data_dir)
    names = TRAIN_FILES if train else (VAL_FILE,)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise StageError(
            f"ImageNet 64×64 files missing under {root}: {', '.join(missing)}. Download the npz archives "
            f"(train and val) from {SITE} and extract them into {root}"
        )
    parts = [_read(root / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
