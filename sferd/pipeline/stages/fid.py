"""Stage `fid`: draw one sample set and measure its FID against the reference split (DESIGN.md step 5).

Sources: a model sampled with DDIM (teacher or student), or a calibration set (held-out real images: the
floor; Gaussian noise images: the ceiling). Samples are saved as one .npz (uint8 N×H×W×C, labels, seeds)
so FID can be recomputed with another implementation without resampling. Sample k uses seed
`sample_seed_start + k` for its noise and class, so the set does not depend on batch size or sharding.
The metrics file records which FID, on what, with which seeds — the number is meaningless without it.
When the spec asks for them, the same stage adds the Inception Score and precision/recall (torch-fidelity's
implementations, same extractor) and the settings they were computed with.
"""

from __future__ import annotations

import numpy as np

from sferd.metrics import keys
from sferd.pipeline.artifacts import fresh_dir, read_npz, sha256_file, write_json, write_npz
from sferd.pipeline.errors import StageError
from sferd.pipeline.stages.common import load_model


def _reference_statistics(reference: dict, weights_sha256: str) -> dict:
    """The reference-statistics stage's output, checked against the weights this stage measures with."""
    import json
    from pathlib import Path

    folder = Path(reference["stats_dir"])
    info_path = folder / "stats.json"
    if not info_path.is_file():
        raise StageError(f"no reference statistics in {folder}: run `dvc repro {folder.name}` first")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info[keys.WEIGHTS_SHA256] != weights_sha256:
        raise StageError(f"reference statistics in {folder} were computed with other extractor weights: "
                         f"re-run `dvc repro {folder.name}`")
    with np.load(folder / info["file"], allow_pickle=False) as z:
        return {"mu": z["mu"], "sigma": z["sigma"], "ref_sha256": info[keys.REF_SHA256]}


def _reference_images(reference: dict, ref_sha256: str) -> np.ndarray:
    """The reference images themselves (precision/recall compare against real-image features, not statistics),
    checked to be the very file the reference statistics were computed from."""
    path = reference["path"]
    if sha256_file(path) != ref_sha256:
        raise StageError(f"{path} is not the reference set the statistics in {reference['stats_dir']} were computed "
                         f"from: re-run the reference-statistics stage")
    return read_npz(path)["images"]


def seed_range(start: int, n: int) -> str:
    return f"{start}-{start + n - 1}"


def _sample_model(params: dict, seeds: np.ndarray, label: str, make_sampler=None) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.diffusion.sampler import ddim_sample, per_sample_noise, to_uint8
    from sferd.methods.training import Progress

    src = params["source"]
    model_cfg = src["model"]
    net = load_model(src["checkpoint"], model_cfg)
    if make_sampler is not None:  # a method-specific sampler (SFERD: latent prior + shifted student)
        sample = make_sampler(src, net, params["steps"])
    else:
        denoiser = NetworkDenoiser(net, src["parameterization"])

        def sample(noise, seeds, y):
            return ddim_sample(denoiser, noise, params["steps"], y=y, clip=True)
    shape = (model_cfg["in_channels"], model_cfg["resolution"], model_cfg["resolution"])
    num_classes = model_cfg.get("num_classes")
    labels = np.full(len(seeds), -1, dtype=np.int64)
    if num_classes:
        # class of sample k from its own seed (an independent stream from its noise)
        labels = np.array([np.random.default_rng([int(s), 1]).integers(num_classes) for s in seeds], dtype=np.int64)
    chunks = []
    bs = params["sample_batch_size"]
    progress = Progress(label, len(seeds))
    try:
        for lo in range(0, len(seeds), bs):
            idx = slice(lo, lo + bs)
            noise = per_sample_noise(seeds[idx], shape)
            y = torch.from_numpy(labels[idx]) if num_classes else None
            chunks.append(to_uint8(sample(noise, seeds[idx], y)))
            progress.update(len(noise))
    finally:
        progress.close()
    return np.concatenate(chunks), labels


def _noise_images(seeds: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    from sferd.diffusion.sampler import per_sample_noise, to_uint8

    return to_uint8(per_sample_noise(seeds, shape).clamp(-1, 1))


def run(name: str, params: dict, *, make_sampler=None, extra_metrics=None) -> None:
    """`make_sampler(source, net, steps) -> sample(noise, seeds, y)` replaces DDIM for methods with their own
    sampler; `extra_metrics(params)` adds method-specific cost keys. The spec's extra metrics (IS, precision/recall)
    arrive as `params["extra_metrics"]`, absent when only FID is measured."""
    from sferd.metrics.fid import (
        FeatureExtractorWeightsError,
        extra_metrics_provenance,
        fid_provenance,
        measure_samples,
        resolve_feature_extractor_weights,
    )

    extractor = params["feature_extractor"]
    try:  # before any sampling: a missing extractor must not cost a sampling run
        weights = resolve_feature_extractor_weights(extractor, params["feature_weights"])
        provenance = fid_provenance(feature_extractor=extractor, weights_path=weights)  # hashes the weights once
    except FeatureExtractorWeightsError as e:
        raise StageError(str(e)) from e
    ref_stats = _reference_statistics(params["reference"], provenance[keys.WEIGHTS_SHA256])
    metric_settings = params.get("extra_metrics", {})  # IS, precision/recall: only when the spec asks
    ref_images = (_reference_images(params["reference"], ref_stats["ref_sha256"])
                  if keys.METRIC_PRC in metric_settings else None)
    out = fresh_dir(params["outputs"]["dir"])

    src = params["source"]
    start, n = params["sample_seed_start"], params["num_samples"]
    seeds = np.arange(start, start + n, dtype=np.int64)
    steps = params["steps"]
    extra: dict = extra_metrics(params) if extra_metrics is not None else {}
    if src["kind"] in ("model", "sferd"):
        images, labels = _sample_model(params, seeds, name, make_sampler)
        nfe = steps
    elif src["kind"] == "heldout":
        held = read_npz(src["path"])
        images, labels = held["images"], held["labels"]
        seeds = np.full(len(images), -1, dtype=np.int64)  # real images: no sampling seed
        nfe = 0
    elif src["kind"] == "noise":
        c, h, w = params["image_shape"]
        images, labels, nfe = _noise_images(seeds, (c, h, w)), np.full(n, -1, dtype=np.int64), 0
    else:
        raise StageError(f"unknown FID source {src['kind']!r}")
    write_npz(out / "samples.npz", images=images, labels=labels, seeds=seeds)

    try:
        values = measure_samples(images, ref_stats, feature_extractor=extractor, weights_path=weights,
                                 extra=metric_settings, reference_images=ref_images)
    except ValueError as e:  # too few images for a metric's setting (a calibration set smaller than planned)
        raise StageError(str(e)) from e
    fid = values[keys.FID]
    write_json(
        params["outputs"]["metrics"],
        {
            keys.STAGE: name,
            "row": params["row"],
            **values,  # fid, and the extra metrics' values when asked for
            keys.STEPS: steps,
            keys.NFE: nfe,
            **extra,
            keys.NUM_SAMPLES: int(len(images)),
            keys.SEEDS: seed_range(start, n) if src["kind"] != "heldout" else "real images",
            keys.REF: params["reference"]["name"],
            keys.REF_SHA256: ref_stats["ref_sha256"],
            **provenance,
            **extra_metrics_provenance(metric_settings,
                                       num_real=len(ref_images) if ref_images is not None else None),
        },
    )
    print(f"{name}: FID {fid:.3f} ({len(images)} samples, {extractor})"
          + "".join(f", {k} {v:.3f}" for k, v in values.items() if k != keys.FID))
