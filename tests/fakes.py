"""Tiny data files in the real formats, shared by the loader tests and the smoke-scale pipeline test."""

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


def write_metrics(root: Path, name: str, **metrics) -> str:
    """A stage's metrics JSON under root/results/metrics/ (10 samples, seeds 0-9 unless given); its relative path."""
    import json

    rel = f"results/metrics/{name}.json"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps({"num_samples": 10, "seeds": "0-9", **metrics}))
    return rel
