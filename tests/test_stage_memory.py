"""The peak RSS of a real training stage does not grow with the dataset: a teacher stage on an ImageNet-shaped split
of 2,000 images (24.6 MB) and of 200,000 images (2.46 GB, sparse on disk) peaks within a few MiB of each other.

The split is memory-mapped and batches are gathered by positioned reads (sferd/data/store.py), so only the images a
batch uses are ever resident; the float conversion happens per batch on the device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import peak_rss_kib, write_large_fake_split

ROOT = Path(__file__).resolve().parents[1]
BOUND_KIB = 48 * 1024  # far below the 2.4 GB the large split adds; the stage itself peaks at a few hundred MB

MODEL = {
    "in_channels": 3, "out_channels": 3, "resolution": 64, "base_channels": 8, "channel_mult": [1, 1],
    "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "head_channels": None, "dropout": 0.0,
    "num_classes": 1000, "norm_groups": 4,
}


def _stage_peak(d: Path, num_images: int) -> int:
    write_large_fake_split(d / "results/inet-data/train", num_images)
    params = {"inet-teacher": {
        "kind": "teacher", "seed": 0, "precision": "fp32", "model": MODEL,
        "dataset": {"id": "imagenet-64x64", "heldout_fraction": 0.0, "split_seed": 0, "random_flip": True},
        "training": {"updates": 12, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.0, "warmup_updates": 0,
                     "ema_decay": 0.9, "grad_clip_norm": 1.0, "parameterization": "x",
                     "loss_weighting": "truncated_snr", "checkpoint_every_updates": 100},
        "inputs": {"train": "results/inet-data/train"},
        "outputs": {"dir": "results/inet-teacher", "metrics": "results/metrics/inet-teacher.json"},
    }}
    (d / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    code, peak, out = peak_rss_kib(["-m", "sferd.pipeline.run", "--params", "params.json", "inet-teacher"], cwd=d,
                                   env=env)
    assert code == 0, out[-3000:]
    assert json.loads((d / "results/metrics/inet-teacher.json").read_text())["updates"] == 12
    return peak


def test_training_stage_peak_rss_does_not_grow_with_the_dataset(tmp_path):
    small = _stage_peak(tmp_path / "small", 2_000)
    large = _stage_peak(tmp_path / "large", 200_000)
    print(f"peak RSS: small split {small / 1024:.1f} MiB, large split {large / 1024:.1f} MiB")
    assert large - small < BOUND_KIB, (small, large)
