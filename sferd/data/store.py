"""A dataset split on disk, and the one reader every consumer uses (DESIGN.md "Scale": data at scale stays uint8 and
memory-mapped, one copy per node; batches become float on the device).

A split is a folder (the data stage writes `results/<ds>-data/train/` and `results/<ds>-data/heldout/`) holding

- `images.npy`: uint8 N×H×W×C (H = W, C = 1 or 3), a plain .npy file, so `np.load(..., mmap_mode="r")` maps it
  without reading it and every process on a node shares the one copy in the page cache;
- `labels.npy`: int64 N, the class of every image (datasets whose models are unconditional still store theirs).

Writing (`write_split`) streams: images.npy is created at its final size with `numpy.lib.format.open_memmap` and
filled block by block through short-lived maps, so the writer holds one block, never the split; the folder gets its
final name only when complete (`sferd.util.artifacts.atomic_dir`, fsync before rename).

Reading (`open_split`) checks shapes and dtypes and returns an `ImageSplit`:

- `split.images`: the read-only memory map, for passes over the whole split in order (reference statistics, the
  held-out FID set);
- `split.gather(indices)`: a batch of rows, for training. It uses positioned reads (pread), not the map: pages
  touched through a map stay mapped, and count in the process's resident set, until the map goes away, so random
  batches through `images` make every rank's RSS climb towards the dataset's size over an epoch. pread copies just
  the batch out of the page cache (still one copy per node) and leaves the process holding the batch only.
- `to_model_range(split.gather(idx), device)` (sferd.data.arrays) then turns the uint8 batch into float on the device.

A training loop, for instance:

    split = open_split(params["inputs"]["train"])          # results/<ds>-data/train
    idx = rng.integers(0, len(split), batch_size)           # rng drawn per global sample, not per rank
    x = to_model_range(split.gather(idx), device)           # N×C×H×W float32 in [-1, 1], on the device
    y = torch.from_numpy(split.labels[idx]).to(device)      # int64 classes

An `ImageSplit` pickles as its path and reopens on the other side (DataLoader workers under spawn), so the map is never
serialised as an array.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sferd.util.artifacts import atomic_dir, producer_of
from sferd.util.errors import StageError
from sferd.util.progress import Progress

IMAGES = "images.npy"
LABELS = "labels.npy"
# bytes written through one map: bounds the writer's memory (64 MiB) whatever the split's size
WRITE_BLOCK_BYTES = 64 << 20


def _rerun_hint(path: Path, produced_by: str) -> str:
    stage = produced_by or producer_of(path)
    return f"re-run the stage that writes it: `dvc repro {stage}`" if stage else "re-run the stage that writes it"


class ImageSplit:
    """One split opened for reading: `images` (read-only uint8 N×H×W×C map), `labels` (int64 N, in memory),
    `len()`, `resolution` (H = W), `channels` (C), `gather(indices)` and `sha256()`. Made by `open_split`."""

    def __init__(self, path: Path, images: np.memmap, labels: np.ndarray):
        self.path = path
        self.images = images
        self.labels = labels
        self._row_bytes = int(np.prod(images.shape[1:]))
        self._data_offset = int(images.offset)  # where row 0 starts in images.npy (after the .npy header)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._sha256: str | None = None

    # ---- shape
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"ImageSplit({str(self.path)!r}, {len(self)} × {self.resolution}×{self.resolution}×{self.channels})"

    # ---- batches
    def gather(self, indices: np.ndarray) -> np.ndarray:
        """uint8 len(indices)×H×W×C: row `indices[k]` at position k (any order, repeats allowed).

        The distinct rows are read once each in ascending order, consecutive ones in a single read, so a batch is
        one forward sweep through the file; the result is a fresh, writable array (nothing of it stays mapped).
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise TypeError(f"gather needs a 1-D array of integer indices, got {idx.dtype} {idx.shape}")
        n = len(self)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            # no negative indices from the end: a negative index here is a bug upstream, not a request
            raise IndexError(f"indices must lie in 0…{n - 1} for {self.path}, "
                             f"got {int(idx.min())}…{int(idx.max())}")
        rows, inverse = np.unique(idx.astype(np.int64, copy=False), return_inverse=True)
        out = np.empty((len(rows), *self.image_shape), dtype=np.uint8)
        flat = out.reshape(len(rows), self._row_bytes)
        # runs of consecutive rows: [starts[j], ends[j]) in `rows`
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks)).astype(np.int64)
        ends = np.concatenate((breaks, [len(rows)])).astype(np.int64)
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e > s:
                self._read_rows(int(rows[s]), flat[s:e])
        if len(rows) == len(idx) and np.array_equal(rows, idx):
            return out  # already in the asked order (sorted, no repeats): skip the reordering copy
        return out[inverse.reshape(-1)]

    def _read_rows(self, first: int, into: np.ndarray) -> None:
        fd = self._file()
        view = memoryview(into).cast("B")
        offset = self._data_offset + first * self._row_bytes
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [view[done:]], offset + done)  # straight into the batch: no extra copy
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, len(view) - done, offset + done)
                got = len(chunk)
                view[done:done + got] = chunk
            if got == 0:
                raise StageError(f"{self.path / IMAGES} ends before row {first + (done // self._row_bytes)}; "
                                 f"{_rerun_hint(self.path, '')}")
            done += got

    def _file(self) -> int:
        if self._fd is None:
            with self._lock:  # two loader threads on a fresh split must not open (and leak) two descriptors
                if self._fd is None:
                    self._fd = os.open(self.path / IMAGES, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    # ---- provenance
    def sha256(self) -> str:
        """SHA-256 of images.npy's bytes followed by labels.npy's (`cat images.npy labels.npy | sha256sum`): the
        identity of the data, headers included, that reference statistics and FID records carry. Computed once per
        opened split, reading the files (not the map) so hashing leaves the resident set alone."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for name in (IMAGES, LABELS):
                with open(self.path / name, "rb") as f:
                    for chunk in iter(lambda: f.read(4 << 20), b""):
                        h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    # ---- lifetime
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ImageSplit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        # reopened here (headers checked again); the descriptor is this copy's own, opened on first use
        fresh = open_split(state["path"])
        self.__dict__.update(fresh.__dict__)
        fresh._fd = None


def open_split(path: str | Path, *, produced_by: str = "") -> ImageSplit:
    """Open the split folder `path` (read-only; nothing is read but the headers and the labels).

    Raises StageError, naming the stage to re-run, when the folder or a file is missing, or when images.npy is not
    uint8 N×H×W×C with H = W and C in (1, 3), or labels.npy not int64 N.
    """
    folder = Path(path)
    stage = produced_by or producer_of(folder)
    if not folder.is_dir():
        if folder.suffix == ".npz" and folder.is_file():
            raise StageError(f"{folder} is a data file of the older npz format; splits are folders now: recompile "
                             f"(`sferd-spec compile`) and re-run the data stage"
                             + (f" (`dvc repro {stage}`)" if stage else ""))
        hint = f" (produced by stage {stage}: run `dvc repro {stage}`)" if stage else ""
        raise StageError(f"{folder} is missing{hint}")
    for name in (IMAGES, LABELS):
        if not (folder / name).is_file():
            raise StageError(f"{folder / name} is missing; {_rerun_hint(folder, stage)}")
    try:
        images = np.load(folder / IMAGES, mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / LABELS, allow_pickle=False)
    except (OSError, ValueError) as e:  # a bad header, or a file shorter than its header says
        raise StageError(f"{folder} is not a readable split ({e}); {_rerun_hint(folder, stage)}") from None
    shape = images.shape
    if images.dtype != np.uint8 or len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3):
        raise StageError(f"{folder / IMAGES} is {images.dtype} {shape}, expected uint8 N×H×W×C with H = W and "
                         f"C in (1, 3); {_rerun_hint(folder, stage)}")
    if not isinstance(images, np.memmap) or not images.flags.c_contiguous:
        # gather reads rows as byte ranges of the file: that needs a row-major (C-order) .npy, as write_split writes
        raise StageError(f"{folder / IMAGES} is not a row-major .npy file; {_rerun_hint(folder, stage)}")
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise StageError(f"{folder / LABELS} is {labels.dtype} {labels.shape}, expected int64 ({images.shape[0]},) "
                         f"to match the images; {_rerun_hint(folder, stage)}")
    labels.flags.writeable = False  # shared by every reader of this split object
    return ImageSplit(folder, images, labels)


@contextmanager
def reading_the_map() -> Iterator[None]:
    """Silence torch's "NumPy array is not writable" warning while `split.images` is handed to code that makes a
    tensor of each image (sferd.metrics.fid.NpzImages): that code only reads, and copies every image it returns
    (permute + contiguous, or the grey→RGB repeat), so the read-only map is never aliased by a returned tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class SplitSource:
    """What `write_split` consumes: the number of images and their (H, W, C), known before any pixel is read (so the
    output can be laid out, and a malformed source refused, before anything is written), and `blocks()`, which yields
    (uint8 n×H×W×C, integer n) pieces of the split in order. A loader reads its files lazily inside `blocks()`."""

    num_images: int
    image_shape: tuple[int, int, int]
    blocks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray) -> "SplitSource":
        """An in-memory split (digits, CIFAR-10: a few hundred MB at most)."""
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"expected images N×H×W×C and labels N, got {images.shape} and {labels.shape}")
        return cls(int(len(images)), tuple(int(s) for s in images.shape[1:]), lambda: iter([(images, labels)]))


def write_split(path: str | Path, source: SplitSource, *, progress: str | None = None) -> ImageSplit:
    """Write `source` as the split folder `path` (atomically: a complete folder or none) and open it for reading.
    `progress` labels a progress bar with ETA (ImageNet's training split takes minutes to write)."""
    folder = Path(path)
    h, w, c = source.image_shape
    n = int(source.num_images)
    if h != w or c not in (1, 3):
        raise StageError(f"{folder}: images must be square with 1 or 3 channels, got H×W×C = {h}×{w}×{c}")
    with atomic_dir(folder) as tmp:
        images_path = tmp / IMAGES
        mm = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, h, w, c))
        header = int(mm.offset)
        del mm  # the file now has its final size; rows go in through short-lived maps of one block each
        labels = np.empty(n, dtype=np.int64)
        bar = Progress(progress, n) if progress else None
        try:
            _fill(folder, source, images_path, header, labels, bar)
        finally:
            if bar is not None:
                bar.close()
        with open(tmp / LABELS, "wb") as f:  # atomic_dir fsyncs it with images.npy before the rename
            np.save(f, labels, allow_pickle=False)
    return open_split(folder)


def _fill(folder: Path, source: SplitSource, images_path: Path, header: int, labels: np.ndarray,
          bar: Progress | None) -> None:
    """Stream the source's blocks into images.npy (after `header` bytes) and `labels`, checking each block."""
    h, w, c = source.image_shape
    n, row_bytes = len(labels), h * w * c
    pos = 0
    for x, y in source.blocks():
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.uint8 or x.shape[1:] != (h, w, c):
            raise StageError(f"{folder}: a block of {x.dtype} {x.shape} images in a split of uint8 {h}×{w}×{c}")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise StageError(f"{folder}: {len(x)} images came with labels of {y.dtype} {y.shape}")
        if pos + len(x) > n:
            raise StageError(f"{folder}: the source yields more than the {n} images it announced")
        _write_rows(images_path, header + pos * row_bytes, x)
        labels[pos:pos + len(x)] = y
        pos += len(x)
        if bar is not None:
            bar.update(len(x))
    if pos != n:
        raise StageError(f"{folder}: the source yielded {pos} images, not the {n} it announced")


def _write_rows(images_path: Path, offset: int, rows: np.ndarray) -> None:
    """Copy `rows` (any strides: e.g. a planar→HWC transpose) into images.npy at byte `offset`, one block per map."""
    if len(rows) == 0:
        return
    per_block = max(1, WRITE_BLOCK_BYTES // int(np.prod(rows.shape[1:])))
    for s in range(0, len(rows), per_block):
        part = rows[s:s + per_block]
        mm = np.memmap(images_path, dtype=np.uint8, mode="r+", offset=offset + s * part[0].size, shape=part.shape)
        mm[...] = part
        del mm  # unmap now: dirty pages go to the page cache, not into this process's resident set
