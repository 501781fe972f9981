"""Stage `data`: materialise the dataset as uint8 npz files (train split, held-out split)."""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.artifacts import fresh_dir, write_json, write_npz
from sferd.pipeline.errors import StageError


def run(name: str, params: dict) -> None:
    ds = params["dataset"]
    out = fresh_dir(params["outputs"]["dir"])
    if not ds["id"].startswith("digits-"):
        raise StageError(f"dataset {ds['id']} is not available in this version (only digits-*)")
    from sferd.data.digits import load_digits_uint8, stratified_split

    resolution = int(ds["id"].split("x")[-1])
    images, labels = load_digits_uint8(resolution)
    train, held = stratified_split(labels, ds["heldout_fraction"], ds["split_seed"])
    write_npz(out / "train.npz", images=images[train], labels=labels[train])
    write_npz(out / "heldout.npz", images=images[held], labels=labels[held])
    write_json(
        Path(out) / "config.json",
        {"stage": name, "params": params, "num_train": int(len(train)), "num_heldout": int(len(held))},
    )
    print(f"{name}: {len(train)} training and {len(held)} held-out images at {resolution}×{resolution}")
