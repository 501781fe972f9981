"""Stage `data`: materialise the dataset as uint8 npz files (train split, held-out split)."""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import fresh_dir, write_json, write_npz
from sferd.util.errors import StageError


def run(name: str, params: dict) -> None:
    ds = params["dataset"]
    resolution = int(ds["id"].split("x")[-1])
    # read (and fail on missing files) before touching the output folder, so nothing is left half-written
    if ds["id"].startswith("digits-"):
        from sferd.data.digits import load_digits_uint8, stratified_split

        images, labels = load_digits_uint8(resolution)
        train, held = stratified_split(labels, ds["heldout_fraction"], ds["split_seed"])
        splits = {"train": (images[train], labels[train]), "heldout": (images[held], labels[held])}
    else:
        src = params.get("source")
        if not src:
            raise StageError(f"dataset {ds['id']} needs dataset.source.data_dir in the spec; recompile")
        if ds["id"] == "cifar10-32x32":
            from sferd.data.cifar10 import load_cifar10

            kw = {"download": src["download"], "verify_checksums": src["verify_checksums"]}
            # the held-out split is the official test set
            splits = {"train": load_cifar10(src["data_dir"], train=True, **kw),
                      "heldout": load_cifar10(src["data_dir"], train=False, **kw)}
        elif ds["id"] == "imagenet-64x64":
            from sferd.data.imagenet64 import load_imagenet64

            splits = {"train": load_imagenet64(src["data_dir"], train=True),
                      "heldout": load_imagenet64(src["data_dir"], train=False)}
        else:
            raise StageError(f"no loader for dataset {ds['id']}")
    out = fresh_dir(params["outputs"]["dir"])
    for split, (x, y) in splits.items():
        write_npz(out / f"{split}.npz", images=x, labels=y)
    n_train, n_held = len(splits["train"][1]), len(splits["heldout"][1])
    write_json(Path(out) / "config.json", {"stage": name, "params": params, "num_train": n_train, "num_heldout": n_held})
    print(f"{name}: {n_train} training and {n_held} held-out images at {resolution}×{resolution}")
