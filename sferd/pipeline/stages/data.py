"""Stage `data`: materialise the dataset as two memory-mappable splits, `train/` and `heldout/`
(sferd/data/store.py: `images.npy` uint8 N×H×W×C + `labels.npy` int64 N per folder, each written atomically)."""

from __future__ import annotations

from pathlib import Path

from sferd.data.store import SplitSource, write_split
from sferd.util.artifacts import fresh_dir, write_json
from sferd.util.errors import StageError

SPLITS = ("train", "heldout")


def _sources(ds: dict, params: dict) -> dict[str, SplitSource]:
    """Both splits' sources, with every input file found and checked: nothing is written before this returns."""
    resolution = int(ds["id"].split("x")[-1])
    if ds["id"].startswith("digits-"):
        from sferd.data.digits import load_digits_uint8, stratified_split

        images, labels = load_digits_uint8(resolution)
        train, held = stratified_split(labels, ds["heldout_fraction"], ds["split_seed"])
        return {"train": SplitSource.from_arrays(images[train], labels[train]),
                "heldout": SplitSource.from_arrays(images[held], labels[held])}
    src = params.get("source")
    if not src:
        raise StageError(f"dataset {ds['id']} needs dataset.source.data_dir in the spec; recompile")
    if ds["id"] == "cifar10-32x32":
        from sferd.data.cifar10 import load_cifar10

        kw = {"download": src["download"], "verify_checksums": src["verify_checksums"]}
        # the held-out split is the official test set; 50k + 10k images are 184 MB: in memory is fine
        return {"train": SplitSource.from_arrays(*load_cifar10(src["data_dir"], train=True, **kw)),
                "heldout": SplitSource.from_arrays(*load_cifar10(src["data_dir"], train=False, **kw))}
    if ds["id"] == "imagenet-64x64":
        from sferd.data.imagenet64 import imagenet64_source

        # the held-out split is the official validation file; pixels are read while writing, file by file
        return {"train": imagenet64_source(src["data_dir"], train=True),
                "heldout": imagenet64_source(src["data_dir"], train=False)}
    raise StageError(f"no loader for dataset {ds['id']}")


def run(name: str, params: dict) -> None:
    ds = params["dataset"]
    resolution = int(ds["id"].split("x")[-1])
    sources = _sources(ds, params)
    for split, s in sources.items():
        if s.image_shape[:2] != (resolution, resolution):
            raise StageError(f"dataset {ds['id']}: the {split} images are {s.image_shape[0]}×{s.image_shape[1]}, "
                             f"not {resolution}×{resolution}")
    out = fresh_dir(params["outputs"]["dir"])
    counts = {split: len(write_split(Path(out) / split, sources[split], progress=f"{name} {split}"))
              for split in SPLITS}
    write_json(Path(out) / "config.json", {"stage": name, "params": params, "num_train": counts["train"],
                                           "num_heldout": counts["heldout"]})
    print(f"{name}: {counts['train']} training and {counts['heldout']} held-out images at {resolution}×{resolution}")
