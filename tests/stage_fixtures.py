"""Tiny training-stage params and a workspace with a digits-shaped training split, for tests that run real stage
processes (data-parallel equality, kill-and-resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODEL = {
    "in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None, "dropout": 0.1,
    "num_classes": 3, "norm_groups": 4,
}  # dropout > 0 and class-conditional: the keyed masks and the labels must follow their samples across ranks
STUDENT = {**MODEL, "dropout": 0.0}
DATASET = {"id": "digits-8x8", "heldout_fraction": 0.2, "split_seed": 0, "random_flip": True}


def stages(updates: int = 6, checkpoint_every: int = 3) -> dict:
    teacher = {
        "kind": "teacher", "seed": 0, "precision": "fp32", "dataset": DATASET, "model": MODEL,
        "training": {"updates": updates, "batch_size": 10, "lr": 1e-3, "weight_decay": 0.0, "warmup_updates": 2,
                     "ema_decay": 0.5, "grad_clip_norm": 1.0, "parameterization": "x",
                     "loss_weighting": "truncated_snr", "checkpoint_every_updates": checkpoint_every},
        "inputs": {"train": "results/digits-data/train"},
        "outputs": {"dir": "results/x-teacher", "metrics": "results/metrics/x-teacher.json",
                    "train_log": "results/metrics/x-teacher-train.tsv"},
    }
    distill = {
        "kind": "distill", "guidance": None, "seed": 0, "precision": "fp32", "dataset": DATASET,
        "student_steps": 2, "teacher": {"checkpoint": "results/x-teacher/model.pt", "model": MODEL,
                                        "is_original_teacher": True},
        "model": STUDENT, "parameterization": "x", "loss_weighting": "truncated_snr",
        "training": {"updates": updates, "batch_size": 10, "lr": 1e-3, "grad_clip_norm": 1.0, "checkpoint_every_updates": checkpoint_every},
        "inputs": {"train": "results/digits-data/train"},
        "outputs": {"dir": "results/x-pd-s0002", "metrics": "results/metrics/x-pd-s0002.json"},
    }
    return {"x-teacher": teacher, "x-pd-s0002": distill}


def workspace(d: Path, **kw) -> None:
    from fakes import write_split_arrays

    rng = np.random.default_rng(0)
    write_split_arrays(d / "results/digits-data/train", rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                       rng.integers(0, 3, 40).astype(np.int64))
    (d / "params.json").write_text(json.dumps(stages(**kw)))
