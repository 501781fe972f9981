"""Stage `reference`: FID statistics of the reference set, computed once (issue 4; D8: the training set).

The output file's name carries the reference data's and the extractor weights' SHA-256 (first 12 hex digits),
so an FID stage can only pick up statistics of exactly the data and weights it measures with.
"""

from __future__ import annotations

import numpy as np

from sferd.metrics import keys
from sferd.util.artifacts import atomic_write_bytes, fresh_dir, read_npz, sha256_file, write_json
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
    ref_sha, w_sha = sha256_file(ref_path), weights.sha256
    stats = reference_statistics(read_npz(ref_path)["images"], feature_extractor=extractor, weights_path=weights,
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
