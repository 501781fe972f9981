"""Stage `reference`: FID statistics of the reference set, computed once (issue 4; D8: the training set).

The output file's name carries the reference data's and the extractor weights' SHA-256 (first 12 hex digits),
so an FID stage can only pick up statistics of exactly the data and weights it measures with. The data is a split
folder (sferd/data/store.py); its SHA-256 is `ImageSplit.sha256()`, over images.npy then labels.npy. The images are
read through the split's memory map in order, a batch at a time, never copied whole into memory.
"""

from __future__ import annotations

import numpy as np

from sferd.metrics import keys
from sferd.data.store import open_split, reading_the_map
from sferd.util.artifacts import atomic_write_bytes, fresh_dir, write_json
from sferd.util.errors import StageError


def run(name: str, params: dict) -> None:
    import io

    from sferd.metrics.fid import (
        FeatureExtractorWeightsError,
        load_feature_weights,
        reference_statistics,
        statistics_file_name,
    )

    extractor, ref_path = params["feature_extractor"], params["reference"]["path"]
    try:
        weights = load_feature_weights(extractor, params["feature_weights"])  # read once: hashed = measured with
    except FeatureExtractorWeightsError as e:
        raise StageError(str(e)) from e
    split = open_split(ref_path)
    ref_sha, w_sha = split.sha256(), weights.sha256
    with reading_the_map():
        stats = reference_statistics(split.images, feature_extractor=extractor, weights_path=weights,
                                     batch_size=params["batch_size"])
    out = fresh_dir(params["outputs"]["dir"])
    buf = io.BytesIO()
    np.savez(buf, mu=stats["mu"], sigma=stats["sigma"], num_images=stats["num_images"])
    fname = statistics_file_name(extractor, ref_sha, w_sha)
    atomic_write_bytes(out / fname, buf.getvalue())
    write_json(out / "stats.json", {"stage": name, "file": fname, keys.REF: params["reference"]["name"],
                                    keys.REF_SHA256: ref_sha, keys.FEATURE_EXTRACTOR: extractor,
                                    keys.WEIGHTS_SHA256: w_sha, "num_images": int(stats["num_images"])})
    print(f"{name}: {extractor} statistics of {int(stats['num_images'])} reference images → {fname}")
