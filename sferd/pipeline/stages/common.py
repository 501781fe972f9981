"""Helpers shared by the stage modules: seeding, checkpoint payloads, loading models for sampling."""

from __future__ import annotations

from typing import Any

import sferd
from sferd.util.artifacts import check_model_config, producer_of, torch_load


def checkpoint_payload(model, params: dict[str, Any], *, weights: str) -> dict[str, Any]:
    """What `model.pt` holds: tensors + the resolved config + package version (no pickled code)."""
    return {
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "config": params,
        "weights": weights,
        "sferd_version": sferd.__version__,
    }


def load_model(path: str, model_cfg: dict[str, Any]):
    """Build the network described by `model_cfg` and load a checkpoint that must match it."""
    from sferd.nn.build import build_unet

    ckpt = torch_load(path)
    check_model_config(ckpt, model_cfg, path=path, produced_by=producer_of(path))
    net = build_unet(model_cfg)
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False)


def training_labels(model_cfg: dict[str, Any], data: dict):
    """Class labels for conditional models (D6), None for unconditional ones."""
    import torch

    return torch.from_numpy(data["labels"]).long() if model_cfg.get("num_classes") else None


class _NpzSplit:
    """A training split read from the data stage's npz (replaced by the memory-mapped store)."""

    def __init__(self, path: str):
        from sferd.util.artifacts import read_npz

        data = read_npz(path)
        self.images, self.labels = data["images"], data["labels"]

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, idx):
        return self.images[idx]


def open_training_split(path: str):
    return _NpzSplit(path)


def stage_stream(name: str) -> int:
    """The per-sample generator stream of a stage: its name, so two stages with one seed draw different numbers."""
    import zlib

    return zlib.crc32(name.encode("utf-8"))


def training_log_path(params: dict[str, Any]) -> str | None:
    """Where the engine writes the per-update log (a DVC plot), when the compiled stage declares one."""
    return params["outputs"].get("train_log")
