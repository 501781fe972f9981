"""Data files in the real formats, shared by the loader, store and stage tests and the smoke-scale pipeline test: tiny
ones, and a large sparse split (`write_large_fake_split`) for the memory tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_fake_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta in the official pickle layout:
    `data` N×3072 uint8 (R plane, G plane, B plane), `labels` a list of ints."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": per_batch}, f, protocol=2)
    return written


def write_fake_imagenet64(root: Path, per_file: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"train_data_batch_{k}" for k in range(1, 11)] + ["val_data"]:
        data = rng.integers(0, 256, (per_file, 3 * 64 * 64), dtype=np.uint8)
        labels = rng.integers(1, 1001, per_file)
        extra = {"mean": data.mean(0)} if name.startswith("train") else {}
        np.savez(root / f"{name}.npz", data=data, labels=labels, **extra)
        written[name] = (data, labels)
    return written


def write_split_arrays(folder: Path, images: np.ndarray, labels: np.ndarray | None = None):
    """A split folder (sferd/data/store.py) holding `images` (uint8 N×H×W×C) and `labels` (default: zeros), written by
    the data stage's own writer; the opened ImageSplit."""
    from sferd.data.store import SplitSource, write_split

    labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels, np.int64)
    return write_split(folder, SplitSource.from_arrays(np.asarray(images, np.uint8), labels))


def fake_row(index: int, shape: tuple[int, int, int] = (64, 64, 3)) -> np.ndarray:
    """The content `write_large_fake_split` gives a marked row: every byte (index mod 255) + 1 (never 0, the value
    of the unmarked rows), the first 8 bytes the index itself, so a row read from the wrong place cannot pass."""
    row = np.full(shape, index % 255 + 1, dtype=np.uint8)
    row.reshape(-1)[:8] = np.frombuffer(np.int64(index).tobytes(), np.uint8)
    return row


def write_large_fake_split(folder: Path, num_images: int, *, resolution: int = 64, channels: int = 3,
                           marked: int = 256) -> np.ndarray:
    """A split in the real format (the data stage's header, `open_split` accepts it) of any size in about a second
    and next to no disk: images.npy is created at full size with `open_memmap`, which leaves it sparse, and only
    `marked` rows spread evenly over the split are written (`fake_row(i)`); all others read as zeros. Labels are
    i mod 1000 (ImageNet's classes). Returns the marked row indices. An ImageNet-shaped split of 200k images is
    2.5 GB to every reader but takes ~3 MB of disk."""
    from sferd.data.store import IMAGES, LABELS
    from sferd.util.artifacts import atomic_dir

    shape = (resolution, resolution, channels)
    rows = np.unique(np.linspace(0, num_images - 1, min(marked, num_images)).astype(np.int64))
    with atomic_dir(folder) as tmp:
        images = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(num_images, *shape))
        for i in rows.tolist():
            images[i] = fake_row(i, shape)
        images.flush()
        del images
        np.save(tmp / LABELS, np.arange(num_images, dtype=np.int64) % 1000)
    return rows


# Runs `-m MODULE args…`, `-c CODE args…` or `SCRIPT args…` as `python` would, then writes the process's VmHWM (its
# own peak resident set, KiB) to $SFERD_PEAK_RSS_FILE on the way out, whatever the exit status.
_PEAK_REPORTER = """
import atexit, os, runpy, sys

def _report():
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["SFERD_PEAK_RSS_FILE"], "w") as f:
        f.write(str(hwm))

atexit.register(_report)
mode, target, *rest = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif mode == "-c":
    sys.argv = ["-c", *rest]
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = [target, *rest]
    runpy.run_path(target, run_name="__main__")
"""


def peak_rss_kib(args: list[str], *, cwd=None, env: dict | None = None,
                 timeout: float = 300) -> tuple[int, int, str]:
    """Run `python ARGS…` (ARGS as for the interpreter: `-m module …`, `-c code …` or `script …`) to the end:
    (exit code, the process's peak resident set in KiB, its stdout+stderr). Linux only.

    The peak is the process's own VmHWM, read by itself at exit. Not ru_maxrss from wait4 or RUSAGE_CHILDREN: the
    kernel folds the parent's high-water mark into a child's at fork/exec, so a child of a pytest process that has
    imported torch "peaks" at the parent's ~800 MB whatever it does. Compare two runs that differ in one thing only
    (the dataset's size, say). Put MALLOC_MMAP_THRESHOLD_ in `env` to make glibc hand every large freed buffer
    straight back (tests/test_store.py): otherwise its adaptive threshold parks freed buffers in the heap and the
    peak of identical runs wanders by tens of MB."""
    import os
    import subprocess
    import sys
    import tempfile

    mode, *rest = args
    if mode not in ("-m", "-c"):
        mode, rest = "script", args
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "peak")
        env = {**(os.environ if env is None else env), "SFERD_PEAK_RSS_FILE": report}
        r = subprocess.run([sys.executable, "-c", _PEAK_REPORTER, mode, *rest], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True)
        with open(report) as f:
            peak = int(f.read())
    return r.returncode, peak, r.stdout


def write_metrics(root: Path, name: str, **metrics) -> str:
    """A stage's metrics JSON under root/results/metrics/ (10 samples, seeds 0-9 unless given); its relative path."""
    import json

    rel = f"results/metrics/{name}.json"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps({"num_samples": 10, "seeds": "0-9", **metrics}))
    return rel
