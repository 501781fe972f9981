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


def open_training_split(path: str):
    """The data stage's memory-mapped split folder (sferd/data/store.py): `gather(idx)`, `labels`, `len()`."""
    from sferd.data.store import open_split

    return open_split(path)


def stage_stream(name: str) -> int:
    """The per-sample generator stream of a stage: its name, so two stages with one seed draw different numbers."""
    import zlib

    return zlib.crc32(name.encode("utf-8"))


def training_log_path(params: dict[str, Any]) -> str | None:
    """Where the engine writes the per-update log (a DVC plot), when the compiled stage declares one."""
    return params["outputs"].get("train_log")
