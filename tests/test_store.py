"""The split format and its reader (sferd/data/store.py): round trip, gather order and locality, the data's SHA-256,
clear errors for missing or malformed splits, to_model_range on the device, and the memory property issue 9 asks
for: reading random batches from a memory-mapped split keeps a process's peak RSS independent of the split's size."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import fake_row, peak_rss_kib, write_large_fake_split, write_split_arrays

from sferd.data.arrays import to_model_range
from sferd.data.store import IMAGES, LABELS, ImageSplit, SplitSource, open_split, write_split
from sferd.util.errors import StageError

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, side: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, c), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ round trip


def test_write_then_open_round_trips_images_and_labels(tmp_path):
    x, y = _images(37), np.arange(37, dtype=np.int64) * 3
    split = write_split(tmp_path / "train", SplitSource.from_arrays(x, y))
    assert isinstance(split, ImageSplit) and len(split) == 37
    assert (split.resolution, split.channels, split.image_shape) == (8, 3, (8, 8, 3))
    again = open_split(tmp_path / "train")
    assert isinstance(again.images, np.memmap) and again.images.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(again.images), x)
    np.testing.assert_array_equal(again.labels, y)
    assert again.labels.dtype == np.int64
    with pytest.raises(ValueError):  # read-only: no consumer can scribble on the shared copy
        again.images[0, 0, 0, 0] = 1
    # plain .npy files: anything that reads numpy reads them
    np.testing.assert_array_equal(np.load(tmp_path / "train" / IMAGES), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temporary sibling left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "train").stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not private


def test_grey_and_empty_splits(tmp_path):
    grey = write_split(tmp_path / "g", SplitSource.from_arrays(_images(5, 16, 1), np.zeros(5, np.int64)))
    assert (grey.resolution, grey.channels) == (16, 1)
    empty = write_split(tmp_path / "e", SplitSource.from_arrays(_images(0), np.zeros(0, np.int64)))
    assert len(empty) == 0 and empty.gather(np.zeros(0, np.int64)).shape == (0, 8, 8, 3)


def test_write_streams_blocks_and_checks_the_announced_count(tmp_path):
    x = _images(10)

    def blocks():  # a strided block (like ImageNet's planar→HWC view) and a contiguous one
        yield np.ascontiguousarray(x[:4].transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1), np.arange(4)
        yield x[4:], np.arange(4, 10)

    split = write_split(tmp_path / "s", SplitSource(10, (8, 8, 3), blocks))
    np.testing.assert_array_equal(np.asarray(split.images), x)
    with pytest.raises(StageError, match="yielded 10 images, not the 11"):
        write_split(tmp_path / "t", SplitSource(11, (8, 8, 3), blocks))
    with pytest.raises(StageError, match="more than the 9"):
        write_split(tmp_path / "t", SplitSource(9, (8, 8, 3), blocks))
    with pytest.raises(StageError, match="float32"):
        write_split(tmp_path / "t", SplitSource(10, (8, 8, 3), lambda: iter([(x.astype(np.float32), np.arange(10))])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # failed writes leave nothing, not even temp folders


def test_a_failed_rewrite_keeps_the_previous_split_whole(tmp_path):
    old = write_split_arrays(tmp_path / "train", _images(6), np.arange(6))
    before = old.sha256()

    def broken():
        yield _images(3, seed=1), np.arange(3)
        raise StageError("source died half way")

    with pytest.raises(StageError, match="half way"):
        write_split(tmp_path / "train", SplitSource(6, (8, 8, 3), broken))
    assert open_split(tmp_path / "train").sha256() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    new = write_split_arrays(tmp_path / "train", _images(4, seed=2))  # a successful rewrite replaces it
    assert len(open_split(tmp_path / "train")) == 4 and new.sha256() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


# ------------------------------------------------------------------------------------------------ gather


def test_gather_returns_rows_in_the_order_asked_with_repeats(tmp_path):
    x = _images(50)
    split = write_split_arrays(tmp_path / "s", x)
    for idx in ([5, 3, 3, 49, 0, 1, 2, 10], list(range(50)), [7], [49, 48, 47], [0, 0, 0]):
        got = split.gather(np.array(idx))
        np.testing.assert_array_equal(got, x[idx])
        assert type(got) is np.ndarray and got.flags.writeable and got.flags.c_contiguous
    got = split.gather(torch.tensor([4, 2]))  # indices from a torch generator work as they are
    np.testing.assert_array_equal(got, x[[4, 2]])


def test_gather_refuses_bad_indices(tmp_path):
    split = write_split_arrays(tmp_path / "s", _images(5))
    with pytest.raises(IndexError, match="0…4"):
        split.gather(np.array([0, 5]))
    with pytest.raises(IndexError):  # not "the last row": a negative index here is a bug upstream
        split.gather(np.array([-1]))
    with pytest.raises(TypeError):
        split.gather(np.array([0.0, 1.0]))
    with pytest.raises(TypeError):
        split.gather(np.zeros((2, 2), np.int64))


def test_gather_reads_each_distinct_row_once_in_ascending_order_coalescing_runs(tmp_path, monkeypatch):
    x = _images(20)
    split = write_split_arrays(tmp_path / "s", x)
    row = 8 * 8 * 3
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def recording(fd, buffers, offset):
        calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", recording)
    got = split.gather(np.array([9, 3, 4, 5, 17, 3, 4]))
    np.testing.assert_array_equal(got, x[[9, 3, 4, 5, 17, 3, 4]])
    start = split.images.offset
    assert calls == [(start + 3 * row, 3 * row), (start + 9 * row, row), (start + 17 * row, row)]


def test_a_split_pickles_as_its_path_and_reopens(tmp_path):
    """DataLoader workers under spawn get the split by pickle: that must not serialise the map as an array."""
    x = _images(64, 32)
    split = write_split_arrays(tmp_path / "s", x)
    split.gather(np.array([1]))  # has an open descriptor now
    blob = pickle.dumps(split)
    assert len(blob) < 1000
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.gather(np.array([3, 1])), x[[3, 1]])
    split.close()
    np.testing.assert_array_equal(back.gather(np.array([2])), x[[2]])  # its own descriptor, not the original's


# ------------------------------------------------------------------------------------------------ sha256


def test_sha256_is_that_of_images_then_labels_bytes_and_tracks_both(tmp_path):
    x, y = _images(9), np.arange(9)
    split = write_split_arrays(tmp_path / "a", x, y)
    raw = (tmp_path / "a" / IMAGES).read_bytes() + (tmp_path / "a" / LABELS).read_bytes()
    assert split.sha256() == hashlib.sha256(raw).hexdigest()
    assert write_split_arrays(tmp_path / "b", x, y).sha256() == split.sha256()  # deterministic bytes
    y2 = y.copy()
    y2[4] += 1
    assert write_split_arrays(tmp_path / "c", x, y2).sha256() != split.sha256()
    x2 = x.copy()
    x2[8, 7, 7, 2] ^= 1
    assert write_split_arrays(tmp_path / "d", x2, y).sha256() != split.sha256()


# ------------------------------------------------------------------------------------------------ errors


def test_missing_split_names_the_stage_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError) as e:
        open_split("results/cifar10-data/train")
    msg = str(e.value)
    assert "results/cifar10-data/train is missing" in msg and "`dvc repro cifar10-data`" in msg and "\n" not in msg
    (tmp_path / "results/cifar10-data/train").mkdir(parents=True)
    with pytest.raises(StageError, match=r"labels\.npy is missing.*dvc repro cifar10-data"):
        np.save(tmp_path / "results/cifar10-data/train" / IMAGES, _images(2))
        open_split("results/cifar10-data/train")
    np.savez(tmp_path / "results/cifar10-data/old.npz", images=_images(2))
    with pytest.raises(StageError, match="older npz format.*sferd-spec compile.*dvc repro cifar10-data"):
        open_split("results/cifar10-data/old.npz")


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((3, 8, 8, 3), np.float32), np.zeros(3, np.int64), "float32"),
    (np.zeros((3, 8, 6, 3), np.uint8), np.zeros(3, np.int64), "H = W"),
    (np.zeros((3, 8, 8, 4), np.uint8), np.zeros(3, np.int64), "C in"),
    (np.zeros((3, 64), np.uint8), np.zeros(3, np.int64), "N×H×W×C"),
    (np.zeros((3, 8, 8, 3), np.uint8), np.zeros(2, np.int64), r"labels\.npy is int64 \(2,\)"),
    (np.zeros((3, 8, 8, 3), np.uint8), np.zeros(3, np.int32), "int32"),
    (np.asfortranarray(np.zeros((3, 8, 8, 3), np.uint8)), np.zeros(3, np.int64), "row-major"),
])
def test_malformed_splits_are_refused_naming_the_stage(tmp_path, monkeypatch, images, labels, match):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "results/x-data/train"
    d.mkdir(parents=True)
    np.save(d / IMAGES, images)
    np.save(d / LABELS, labels)
    with pytest.raises(StageError, match=match) as e:
        open_split("results/x-data/train")
    assert "dvc repro x-data" in str(e.value)


def test_truncated_images_file_is_refused(tmp_path):
    write_split_arrays(tmp_path / "s", _images(10))
    f = tmp_path / "s" / IMAGES
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(StageError, match="not a readable split"):
        open_split(tmp_path / "s")


# ------------------------------------------------------------------------------------------------ to_model_range


def test_to_model_range_values_layout_and_device(tmp_path):
    x = _images(4, 8, 3)
    ref = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    for arg in (x, torch.from_numpy(x)):
        for device in (None, "cpu", torch.device("cpu")):
            t = to_model_range(arg, device)
            assert t.dtype == torch.float32 and t.shape == (4, 3, 8, 8) and t.device.type == "cpu"
            assert torch.equal(t, ref)
    assert to_model_range(np.array([[[[0]], [[255]]]], np.uint8)).flatten().tolist() == [-1.0, 1.0]
    split = write_split_arrays(tmp_path / "s", x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only map converts without torch's non-writable warning
        assert torch.equal(to_model_range(split.images), ref)
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(x.astype(np.float32))
    with pytest.raises(ValueError, match="N×H×W×C"):
        to_model_range(x[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_model_range_converts_on_the_device():
    x = _images(4)
    t = to_model_range(x, "cuda")
    assert t.is_cuda and torch.equal(t.cpu(), to_model_range(x))


# ------------------------------------------------------------------------------------------------ memory

# One process (torch is imported once: ~6 s on a busy machine) measures phases: for each (split, mode) it resets the
# kernel's peak-RSS mark (`5 > /proc/self/clear_refs`), reads BATCHES random batches of BATCH images through
# gather + to_model_range (or, with `map`, by indexing the memory map itself: the control), checks the rows whose
# content it knows, closes the split, and reports how far the peak rose above the RSS the phase started at.
PROBE = """
import json, sys
import numpy as np, torch
from fakes import fake_row
from sferd.data.arrays import to_model_range
from sferd.data.store import open_split

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

torch.set_num_threads(1)
batches, batch = int(sys.argv[1]), int(sys.argv[2])
growth = {}
for phase in sys.argv[3:]:
    path, mode = phase.rsplit(":", 1)
    split = open_split(path)
    marked = np.load(path + "/marked.npy")
    rng = np.random.default_rng(0)

    def step():
        idx = rng.integers(0, len(split), batch)
        idx[:4] = rng.choice(marked, 4)  # rows whose content is known: the batch is checked, not just read
        x = split.gather(idx) if mode == "gather" else np.asarray(split.images[np.sort(idx)])
        t = to_model_range(x, "cpu")
        assert t.shape == (batch, split.channels, split.resolution, split.resolution)
        if mode == "gather":
            for k in range(4):
                assert np.array_equal(x[k], fake_row(int(idx[k]))), int(idx[k])
        float(t.sum())

    step()  # one-time costs (first torch ops, lazy imports) out of the measurement, whichever phase runs first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak := current
    start = status("VmRSS")
    for _ in range(batches):
        step()
    growth[phase] = status("VmHWM") - start
    del split, step  # unmap: the next phase starts from what this one leaves
print(json.dumps(growth))
"""
SMALL, LARGE = 2_000, 200_000  # 24.6 MB and 2.46 GB of 64×64×3 images (the large one sparse: ~3 MB on disk)
BATCHES, BATCH = 20, 128
BOUND_KIB = 32 * 1024  # allowed difference in peak growth: 1.4 % of the large split, 5 batches as float32


@pytest.fixture(scope="module")
def growth_kib(tmp_path_factory) -> dict[str, int]:
    """Peak-RSS growth (KiB) of reading BATCHES×BATCH random images from the small and the large split, through
    gather and through the map."""
    import json

    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux: /proc/self/clear_refs and sparse files")
    root = tmp_path_factory.mktemp("splits")
    for name, n in (("small", SMALL), ("large", LARGE)):
        marked = write_large_fake_split(root / name, n)
        np.save(root / name / "marked.npy", marked)  # beside the split's files: open_split ignores extra files
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           # glibc's adaptive mmap threshold keeps freed batch buffers in the heap, so the peak of identical runs
           # wanders by ~50 MB; fixed, every buffer above 64 KiB goes back when freed and the peak is live memory
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    phases = [f"{root / n}:{m}" for m in ("gather", "map") for n in ("small", "large")]
    code, _, out = peak_rss_kib(["-c", PROBE, str(BATCHES), str(BATCH), *phases], env=env)
    assert code == 0, out
    raw = json.loads(out.strip().splitlines()[-1])
    return {f"{Path(k.rsplit(':', 1)[0]).name}:{k.rsplit(':', 1)[1]}": v for k, v in raw.items()}


def test_peak_rss_of_random_batches_does_not_grow_with_the_split(growth_kib):
    """20 random batches of 128 through `gather` + `to_model_range` from a 24.6 MB and a 2.46 GB ImageNet-shaped
    split: the peak RSS rises by the same amount (within BOUND_KIB) for both."""
    small, large = growth_kib["small:gather"], growth_kib["large:gather"]
    print(f"peak RSS growth over {BATCHES} batches of {BATCH}: small split {small / 1024:.1f} MiB, "
          f"large split {large / 1024:.1f} MiB")
    assert abs(large - small) < BOUND_KIB
    assert BOUND_KIB * 1024 < LARGE * 64 * 64 * 3 / 50


def test_the_rss_measurement_sees_pages_read_through_the_map(growth_kib):
    """The control: the same batches read by indexing the memory map itself leave every touched page (and its
    fault-around neighbours) mapped, and the same measurement shows it on the large split. Without this the test
    above could pass by measuring nothing."""
    small, large = growth_kib["small:map"], growth_kib["large:map"]
    print(f"peak RSS growth through the map: small split {small / 1024:.1f} MiB, large split {large / 1024:.1f} MiB")
    assert large - small > 2 * BOUND_KIB
