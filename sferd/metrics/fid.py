"""FID between two uint8 image sets through torch-fidelity, plus the independent reference formula and provenance.

torch-fidelity is imported inside the functions that need it: importing it costs about two seconds (it pulls in
torchvision), and the CLI imports this package without computing any FID.

Weights are never downloaded implicitly. A pipeline stage must be reproducible offline and must record the SHA-256
of the weights that produced its number, so both extractors need a local file. `load_feature_weights`
(sferd.metrics.weights) reads it once, before any expensive work; every function here takes that `FeatureWeights`
(or a path, which it then reads and verifies itself) as `weights_path`, and measures with exactly those bytes.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sferd.metrics import keys
from sferd.metrics.weights import (  # noqa: F401  (FeatureExtractorWeightsError, SUPPORTED_EXTRACTORS: re-exported)
    SUPPORTED_EXTRACTORS,
    FeatureExtractorWeightsError,
    FeatureWeights,
    as_feature_weights,
    load_feature_weights,
)

Weights = FeatureWeights | str | os.PathLike | None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ inputs


class NpzImages(Dataset):
    """uint8 N x H x W x C images (C = 1 or 3) served as the bare uint8 3 x H x W tensors torch-fidelity expects.

    torch-fidelity checks that `dataset[0]` is a tensor (a `(image, label)` tuple is rejected) and its extractors
    assert dtype uint8 with 3 channels, so grey images are replicated to RGB here, as an image file loader would.
    """

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            # No silent rescaling: a float array could be in [0, 1], [-1, 1] or [0, 255], and guessing wrong
            # produces a plausible-looking but meaningless FID.
            raise TypeError(f"NpzImages needs uint8 images (0..255), got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"NpzImages needs N x H x W x C images with C in (1, 3), got shape {images.shape}")
        self.images = images

    @classmethod
    def from_npz(cls, path: str | os.PathLike, key: str = "images") -> "NpzImages":
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise KeyError(f"{path}: no array {key!r} (has {z.files})")
            return cls(z[key])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        if x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        return x.contiguous()


def _as_dataset(images: np.ndarray | NpzImages, what: str) -> NpzImages:
    ds = images if isinstance(images, NpzImages) else NpzImages(images)
    if len(ds) < 2:
        raise ValueError(f"FID needs at least 2 images per set (a covariance), {what} has {len(ds)}")
    return ds


# ------------------------------------------------------------------------------------------------ weights


def resolve_feature_extractor_weights(
    feature_extractor: str, weights_path: Weights, *, cache_root: str | os.PathLike | None = None
) -> str:
    """The local weights file the extractor will use, checked now (read, hashed, loaded with weights_only=True),
    or FeatureExtractorWeightsError saying what to fetch and where (see sferd.metrics.weights.locate_weights).

    A pre-flight check only: the functions below verify the bytes they measure with again when given a path.
    Callers that record the weights' hash should hold on to `load_feature_weights(...)` instead and pass it on,
    so the recorded hash and the measurement share one read of the file.
    """
    return as_feature_weights(feature_extractor, weights_path, cache_root=cache_root).path


def _extractor(feature_extractor: str) -> str:
    """The torch-fidelity registry name to measure `feature_extractor` with (registered on first use)."""
    from sferd.metrics.extractor import registered_name

    return registered_name(feature_extractor)


# ------------------------------------------------------------------------------------------------ FID


def compute_fid(
    images_a: np.ndarray | NpzImages,
    images_b: np.ndarray | NpzImages,
    *,
    feature_extractor: str,
    weights_path: Weights,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> float:
    """FID between two uint8 N x H x W x C image sets, computed by `torch_fidelity.calculate_metrics`.

    `cache_root` is where stock (Inception) weights are looked up when `weights_path` is None; see
    `sferd.metrics.weights.locate_weights`. torch-fidelity's own feature cache is off: its keys are input names, not
    contents, so a stale entry could silently stand in for new samples.
    """
    weights = as_feature_weights(feature_extractor, weights_path, cache_root=cache_root)
    ds_a, ds_b = _as_dataset(images_a, "images_a"), _as_dataset(images_b, "images_b")
    name = _extractor(feature_extractor)
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=ds_a,
        input2=ds_b,
        fid=True,
        feature_extractor=name,
        feature_extractor_weights_path=weights,  # verified tensors, not a path (sferd.metrics.extractor)
        # torch.compile may change the features numerically (torch-fidelity's own warning) and costs start-up.
        feature_extractor_compile=False,
        cuda=torch.cuda.is_available(),
        verbose=False,
        # save_cpu_ram=True means DataLoader num_workers=0: no worker processes to fork for in-memory arrays.
        save_cpu_ram=True,
        cache=False,
        batch_size=int(batch_size),
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def metric_layers(feature_extractor: str, metrics) -> dict[str, str]:
    """Metric option ("fid", "isc", "prc") → the feature layer torch-fidelity uses for it with this extractor (its
    own per-extractor default: Inception "2048"/"logits_unbiased", digits-cnn "pool"/"logits")."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[_extractor(feature_extractor)]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}


def extract_layers(
    images: np.ndarray | NpzImages,
    layers,
    *,
    feature_extractor: str,
    weights_path: Weights,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Layer name → N x D features, all from one pass of the registered extractor over the images.

    Built from torch-fidelity's own helpers (`create_feature_extractor`, `get_featuresdict_from_dataset`), the
    route `calculate_metrics` takes, so metrics computed from these features differ from it only in bookkeeping.
    """
    weights = as_feature_weights(feature_extractor, weights_path, cache_root=cache_root)
    ds = _as_dataset(images, "images")
    name = _extractor(feature_extractor)
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = torch.cuda.is_available()
    wanted = list(dict.fromkeys(layers))  # FID and PRC share a layer: extract it once
    extractor = create_feature_extractor(name, wanted, cuda=cuda, feature_extractor_weights_path=weights, verbose=False)
    feats = get_featuresdict_from_dataset(ds, extractor, int(batch_size), cuda, True, False)
    return {layer: feats[layer].numpy() for layer in wanted}


def extract_features(
    images: np.ndarray | NpzImages,
    *,
    feature_extractor: str,
    weights_path: Weights,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """The N x D features FID uses, produced by the same registered extractor and layer as `compute_fid`, so the
    only thing an FID recomputed from these features does not share with `compute_fid` is the statistics step."""
    layer = metric_layers(feature_extractor, [keys.METRIC_FID])[keys.METRIC_FID]
    return extract_layers(images, [layer], feature_extractor=feature_extractor, weights_path=weights_path,
                          cache_root=cache_root, batch_size=batch_size)[layer]


def reference_statistics(
    images: np.ndarray | NpzImages,
    *,
    feature_extractor: str,
    weights_path: Weights,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """FID statistics (mu, sigma) of a reference set, by torch-fidelity's own statistics function: computed once
    by the reference-statistics stage instead of once per FID stage (50k–1.28M images at paper scale)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    feats = extract_features(images, feature_extractor=feature_extractor, weights_path=weights_path,
                             cache_root=cache_root, batch_size=batch_size)
    stats = fid_features_to_statistics(torch.from_numpy(feats))
    return {"mu": stats["mu"], "sigma": stats["sigma"], "num_images": np.asarray(len(feats))}


def _fid_from_features(features: np.ndarray, reference: dict[str, np.ndarray]) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(torch.from_numpy(features))
    ref = {"mu": np.asarray(reference["mu"]), "sigma": np.asarray(reference["sigma"])}
    return float(fid_statistics_to_metric(stats, ref, False)[KEY_METRIC_FID])


def fid_against_statistics(
    images: np.ndarray | NpzImages,
    reference: dict[str, np.ndarray],
    *,
    feature_extractor: str,
    weights_path: Weights,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> float:
    """FID of `images` against stored reference statistics: the same extractor, layer, statistics and metric
    functions as `torch_fidelity.calculate_metrics` (a test keeps the two equal)."""
    feats = extract_features(images, feature_extractor=feature_extractor, weights_path=weights_path,
                             cache_root=cache_root, batch_size=batch_size)
    return _fid_from_features(feats, reference)


# ------------------------------------------------------------------------------------------------ IS, PRC


def inception_score(logits: np.ndarray, *, splits: int) -> dict[str, float]:
    """Inception Score (mean and std over `splits`) of N x C class logits, by torch-fidelity's own function with
    the shuffling `calculate_metrics` applies by default (its `samples_shuffle`, `rng_seed`)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits, DEFAULTS["samples_shuffle"],
                                 DEFAULTS["rng_seed"])
    return {keys.ISC: out[KEY_METRIC_ISC_MEAN], keys.ISC_STD: out[KEY_METRIC_ISC_STD]}


def precision_recall(generated: np.ndarray, real: np.ndarray, *, neighborhood: int) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated vs real features, by torch-fidelity's
    own function; its batched variant (save_cpu_ram) keeps memory bounded at 50k × 50k features."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    for what, feats in (("generated", generated), ("real", real)):
        if len(feats) <= neighborhood:
            raise ValueError(f"precision/recall with k = {neighborhood} needs more than {neighborhood} {what} "
                             f"images, got {len(feats)}")
    out = prc_features_to_metric(
        torch.from_numpy(np.asarray(generated)),  # torch-fidelity's convention: input1 generated, input2 real
        torch.from_numpy(np.asarray(real)),
        prc_neighborhood=int(neighborhood),
        prc_batch_size=DEFAULTS["prc_batch_size"],
        save_cpu_ram=True,
        verbose=False,
    )
    return {keys.PRECISION: float(out[KEY_METRIC_PRECISION]), keys.RECALL: float(out[KEY_METRIC_RECALL])}


def measure_samples(
    images: np.ndarray | NpzImages,
    reference: dict[str, np.ndarray],
    *,
    feature_extractor: str,
    weights_path: Weights,
    extra: dict[str, dict[str, int]] | None = None,
    reference_images: np.ndarray | NpzImages | None = None,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID against stored reference statistics plus the metrics `extra` asks for, as metrics-file values.

    `extra` is the graph's `extra_metrics` params: {"isc": {"splits": n}, "prc": {"neighborhood": k}}, either
    optional. One extractor pass over `images` serves every metric; precision/recall also need the reference
    set's own features (`reference_images`: real-image balls, not statistics).
    """
    extra = dict(extra or {})
    unknown = sorted(set(extra) - {keys.METRIC_ISC, keys.METRIC_PRC})
    if unknown:
        raise ValueError(f"unknown extra metrics {unknown}")
    layers = metric_layers(feature_extractor, [keys.METRIC_FID, *extra])
    # one read of the weights for samples and reference images alike
    weights = as_feature_weights(feature_extractor, weights_path, cache_root=cache_root)
    common = {"feature_extractor": feature_extractor, "weights_path": weights, "batch_size": batch_size}
    feats = extract_layers(images, layers.values(), **common)
    out = {keys.FID: _fid_from_features(feats[layers[keys.METRIC_FID]], reference)}
    if keys.METRIC_ISC in extra:
        out.update(inception_score(feats[layers[keys.METRIC_ISC]], splits=extra[keys.METRIC_ISC]["splits"]))
    if keys.METRIC_PRC in extra:
        if reference_images is None:
            raise ValueError("precision/recall need the reference images (reference_images)")
        layer = layers[keys.METRIC_PRC]
        real = extract_layers(reference_images, [layer], **common)[layer]
        out.update(precision_recall(feats[layer], real, neighborhood=extra[keys.METRIC_PRC]["neighborhood"]))
    return out


def extra_metrics_provenance(extra: dict[str, dict[str, int]] | None, *, num_real: int | None) -> dict[str, Any]:
    """The torch-fidelity settings behind the extra metrics' values (empty without extra metrics)."""
    from torch_fidelity.defaults import DEFAULTS

    out: dict[str, Any] = {}
    if keys.METRIC_ISC in (extra or {}):
        out[keys.ISC_SPLITS] = int(extra[keys.METRIC_ISC]["splits"])
        out[keys.ISC_SHUFFLE_SEED] = int(DEFAULTS["rng_seed"]) if DEFAULTS["samples_shuffle"] else None
    if keys.METRIC_PRC in (extra or {}):
        out[keys.PRC_NEIGHBORHOOD] = int(extra[keys.METRIC_PRC]["neighborhood"])
        out[keys.PRC_NUM_REAL] = num_real
    return out


def statistics_file_name(feature_extractor: str, reference_sha256: str, weights_sha256: str) -> str:
    """Cache name of reference statistics: which extractor, which data, which weights (12 hex digits each)."""
    return f"fid-stats-{feature_extractor}-ref{reference_sha256[:12]}-w{weights_sha256[:12]}.npz"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, with scipy's matrix square root.

    Deliberately a different route from torch-fidelity (which sums square roots of eigenvalues of S1 S2), so it
    can serve as an independent oracle in tests.
    """
    import scipy.linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (fewer samples than dimensions): regularise as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the covariances are not valid PSD matrices.
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance in float64, the statistics FID is defined on."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


# ------------------------------------------------------------------------------------------------ provenance


def torch_fidelity_version() -> str:
    # Package metadata avoids importing torch-fidelity just to read its version.
    try:
        return metadata.version("torch-fidelity")
    except metadata.PackageNotFoundError:
        import torch_fidelity

        return torch_fidelity.__version__


def fid_provenance(
    *, feature_extractor: str, weights_path: Weights, cache_root: str | os.PathLike | None = None
) -> dict[str, Any]:
    """What produced an FID number: implementation version, extractor name and the hash of its weights."""
    weights = as_feature_weights(feature_extractor, weights_path, cache_root=cache_root)
    return {
        keys.FID_IMPL: f"torch-fidelity=={torch_fidelity_version()}",
        keys.FEATURE_EXTRACTOR: feature_extractor,
        keys.WEIGHTS_SHA256: weights.sha256,  # of the bytes the measurement loads, when given the same FeatureWeights
    }
