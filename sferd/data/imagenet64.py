"""ImageNet 64×64 from the official downsampled npz files (Chrabaszcz, Loshchilov & Hutter 2017).

The "Imagenet64_train_npz" / "Imagenet64_val_npz" downloads hold `train_data_batch_1.npz` …
`train_data_batch_10.npz` and `val_data.npz`. Each has `data`: N × 12288 uint8, the three colour planes one
after the other (R, G, B, each 64×64 row-major), and `labels`: N class numbers 1…1000. Labels are kept (D6:
the paper-scale ImageNet models are class-conditional) and shifted to 0…999.

The training split is 1.28M images, 15.7 GB: it is never held in memory. `imagenet64_source` checks every file
up front (present, the 64×64 layout, labels in range; it reads the npy headers inside the npz and the labels, not
the pixels) and hands `sferd.data.store.write_split` a source that reads `data` block by block from one file at a
time, straight out of the zip member, so the data stage's memory is one block, not a file and never the split.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from sferd.data.store import SplitSource
from sferd.util.errors import StageError

SITE = "https://image-net.org/download-images.php (Downsampled ImageNet 64x64, npz format)"
TRAIN_FILES = tuple(f"train_data_batch_{k}.npz" for k in range(1, 11))
VAL_FILE = "val_data.npz"
SIDE = 64
ROW_BYTES = 3 * SIDE * SIDE
BLOCK_ROWS = 4096  # 48 MiB of pixels per read


def _npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `fp`, leaving it at the first data byte."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy format version {version}")


class _File:
    """One checked npz file: its path, image count, 0-based labels and whether `data` is stored row by row."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                if not {"data.npy", "labels.npy"} <= names:
                    raise KeyError(f"has {sorted(n.removesuffix('.npy') for n in names)}")
                with zf.open("data.npy") as fp:
                    shape, self.fortran_order, dtype = _npy_header(fp)
                with zf.open("labels.npy") as fp:
                    labels = np.lib.format.read_array(fp, allow_pickle=False)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise StageError(f"{path} is not a downsampled-ImageNet npz file with `data` and `labels` ({e}); "
                             f"re-download it from {SITE}") from None
        if len(shape) != 2 or shape[1] != ROW_BYTES or dtype != np.uint8:
            raise StageError(f"{path}: `data` is {dtype} {shape}, expected uint8 N×{ROW_BYTES} (the 64×64 files)")
        labels = np.asarray(labels).reshape(-1)
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise StageError(f"{path}: labels are {labels.dtype}, expected integer class numbers 1…1000")
        labels = labels.astype(np.int64)
        if len(labels) != shape[0]:
            raise StageError(f"{path}: {shape[0]} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 1 or labels.max() > 1000):
            raise StageError(f"{path}: labels must be 1…1000, found {labels.min()}…{labels.max()}")
        self.num_images = int(shape[0])
        self.labels = labels - 1

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 n×64×64×3, int64 n) blocks in file order, read from the zip member as they are needed."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("data.npy") as fp:
                _npy_header(fp)
                if self.fortran_order:  # column-major rows are not contiguous: this one file is read whole
                    data = np.lib.format.read_array(fp, allow_pickle=False)
                    for s in range(0, self.num_images, BLOCK_ROWS):
                        yield _hwc(np.ascontiguousarray(data[s:s + BLOCK_ROWS])), self.labels[s:s + BLOCK_ROWS]
                    return
                for s in range(0, self.num_images, BLOCK_ROWS):
                    k = min(BLOCK_ROWS, self.num_images - s)
                    buf = _read_exactly(fp, k * ROW_BYTES)
                    yield _hwc(np.frombuffer(buf, dtype=np.uint8).reshape(k, ROW_BYTES)), self.labels[s:s + k]
        except (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile) as e:  # truncated or corrupt member
            raise StageError(f"{self.path} could not be read to the end ({e}); re-download it from {SITE}") from None


def _read_exactly(fp, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = fp.read(n - got)
        if not b:
            raise EOFError(f"`data` ends {n - got} bytes early")
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _hwc(rows: np.ndarray) -> np.ndarray:
    """n×12288 planar RGB rows → n×64×64×3 (a strided view; the writer copies it into place)."""
    return rows.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)


def imagenet64_source(data_dir: str | Path, *, train: bool) -> SplitSource:
    """The training batches (train=True, in file order 1…10) or the validation file, as a source for
    `write_split`: images N×64×64×3 uint8, labels int64 0…999. Missing or malformed files raise StageError here,
    before anything is written."""
    root = Path(data_dir)
    names = TRAIN_FILES if train else (VAL_FILE,)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise StageError(
            f"ImageNet 64×64 files missing under {root}: {', '.join(missing)}. Download the npz archives "
            f"(train and val) from {SITE} and extract them into {root}"
        )
    files = [_File(root / n) for n in names]

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for f in files:
            yield from f.blocks()

    return SplitSource(sum(f.num_images for f in files), (SIDE, SIDE, 3), blocks)
