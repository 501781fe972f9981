"""Feature-extractor weights for FID, read once and verified: what is measured with is exactly what was checked.

A weights file is a user-given path (`evaluation.feature_weights`) or torch hub's cache. Checking the file and
later letting a library open it again leaves a gap in which the file can change (issue 10, item 10): torch-fidelity
0.4.0 reads Inception weights with `torch.load(path, weights_only=False)`, i.e. it would run any pickled code
placed there after the check, and the SHA-256 recorded in the metrics would describe other bytes than the ones
measured with. So the bytes are read once; their SHA-256, the optional expected hash and the
`torch.load(weights_only=True)` all apply to those bytes, and the loaded tensors (never the path) travel on to
the extractor (`sferd.metrics.extractor`). Nothing here imports torch-fidelity unless an error message needs its
download URL.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from sferd.metrics import keys

SUPPORTED_EXTRACTORS = (keys.EXTRACTOR_DIGITS_CNN, keys.EXTRACTOR_INCEPTION)
# torch-fidelity's Inception file is 95.7 MB; the bound keeps a wrong path (a disk image, /dev/zero behind a
# symlink) from being read whole into memory.
MAX_WEIGHTS_BYTES = 1 << 30


class FeatureExtractorWeightsError(FileNotFoundError):
    """The weights a FID feature extractor needs are not available locally, or are not what they should be."""


@dataclass(frozen=True, eq=False)
class FeatureWeights:
    """Weights read from `path` once: `sha256` is the hash of exactly the bytes `state` was loaded from.

    `state` is what `torch.load(weights_only=True)` returned: for "inception-v3-compat" a flat name → tensor state
    dict, for "digits-cnn" the `save_digits_cnn` checkpoint ({"state_dict", "config"}). Extractors copy the
    tensors into their modules, so one FeatureWeights serves any number of extractor instances.
    """

    extractor: str
    path: str
    sha256: str
    state: Mapping[str, Any]

    def __repr__(self) -> str:  # the tensors would flood any message that shows this object
        return f"FeatureWeights({self.extractor!r}, {self.path!r}, sha256={self.sha256[:12]}…)"


def _inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _fetch_hint(url: str, dest: str) -> str:
    return (
        f"Fetch {url} once (on a machine with network) and place it at {dest}, e.g.\n"
        f"    curl -L --create-dirs -o '{dest}' '{url}'\n"
        f"or pass a local copy of that file as the feature-extractor weights path."
    )


def locate_weights(
    feature_extractor: str, weights_path: str | os.PathLike | None, *, cache_root: str | os.PathLike | None = None
) -> str:
    """The file the extractor's weights come from, or FeatureExtractorWeightsError saying what to fetch and where.

    - "digits-cnn": `weights_path` is required (the features stage's `save_digits_cnn` checkpoint).
    - "inception-v3-compat": `weights_path` if given, else the file torch-fidelity would download, looked up in
      `cache_root` (default: torch hub's `checkpoints` directory, where `torch.hub.load_state_dict_from_url`
      caches it). Nothing is ever downloaded here.
    """
    if feature_extractor not in SUPPORTED_EXTRACTORS:
        raise ValueError(f"unknown FID feature extractor {feature_extractor!r}; supported: {SUPPORTED_EXTRACTORS}")
    if feature_extractor == keys.EXTRACTOR_DIGITS_CNN:
        if weights_path is None:
            raise FeatureExtractorWeightsError(
                "FID feature extractor 'digits-cnn' needs weights_path: the checkpoint the quickstart's features "
                "stage writes with save_digits_cnn (results/stages/<pipeline>-features/model.pt). Run that stage "
                "first; there is nothing to download for this extractor."
            )
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FeatureExtractorWeightsError(
                f"FID feature extractor 'digits-cnn': weights file {path} does not exist (it is written by the "
                f"features stage with save_digits_cnn)."
            )
        return path
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FeatureExtractorWeightsError(
                f"FID feature extractor 'inception-v3-compat': weights file {path} does not exist.\n"
                + _fetch_hint(_inception_url(), path)
            )
        return path
    url = _inception_url()
    root = os.fspath(cache_root) if cache_root is not None else os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(root, os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        raise FeatureExtractorWeightsError(
            "FID feature extractor 'inception-v3-compat' has no local weights, and sferd does not let "
            "torch-fidelity download them mid-pipeline (offline machines; the weights' SHA-256 goes into the "
            "metrics).\n" + _fetch_hint(url, path)
        )
    return path


def _read_once(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_WEIGHTS_BYTES + 1)
    if len(data) > MAX_WEIGHTS_BYTES:
        raise FeatureExtractorWeightsError(f"feature-extractor weights {path} exceed {MAX_WEIGHTS_BYTES} bytes; "
                                           f"not a weights file")
    return data


def plain_state_dict(obj: Any, *, source: str) -> dict[str, torch.Tensor]:
    """`obj` as a flat name → dense tensor dict, or FeatureExtractorWeightsError. Only such a dict is ever
    re-serialised for torch-fidelity, so what its full unpickler reads holds nothing but tensors."""
    ok = isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided for k, v in obj.items()
    )
    if not ok:
        raise FeatureExtractorWeightsError(
            f"Inception weights {source} are not a plain state dict (names → dense tensors), which is what "
            "torch-fidelity's pt_inception-2015-12-05 file is."
        )
    # detach(): a Parameter becomes a plain tensor, so the re-serialised file needs no Parameter rebuild either
    return {k: v.detach() for k, v in obj.items()}


def load_feature_weights(
    feature_extractor: str,
    weights_path: str | os.PathLike | None,
    *,
    cache_root: str | os.PathLike | None = None,
    expected_sha256: str | None = None,
) -> FeatureWeights:
    """Locate, read once, hash, check and load (weights_only=True) the extractor's weights.

    `expected_sha256`, when known (e.g. the hash the reference statistics were computed with), must match the
    bytes read. Any failure is a FeatureExtractorWeightsError whose message says what to do.
    """
    path = locate_weights(feature_extractor, weights_path, cache_root=cache_root)
    data = _read_once(path)
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise FeatureExtractorWeightsError(
            f"feature-extractor weights {path} have SHA-256 {sha}, expected {expected_sha256}: the file is not "
            f"the one the measurement was set up with"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a plain tensor file
        raise FeatureExtractorWeightsError(
            f"feature-extractor weights {path} do not load with torch.load(weights_only=True) ({type(e).__name__}); "
            "the suite loads only plain tensor files (no pickled code). For inception-v3-compat use the official "
            "pt_inception-2015-12-05 file."
        ) from None
    if feature_extractor == keys.EXTRACTOR_DIGITS_CNN:
        from sferd.nn.digits_cnn import digits_cnn_from_checkpoint

        try:
            digits_cnn_from_checkpoint(obj, source=path)  # format and architecture, now rather than after sampling
        except (ValueError, RuntimeError, TypeError, KeyError) as e:
            raise FeatureExtractorWeightsError(f"digits-cnn weights {path}: {e}") from None
        state = obj
    else:
        state = plain_state_dict(obj, source=path)
    return FeatureWeights(extractor=feature_extractor, path=path, sha256=sha, state=state)


def as_feature_weights(
    feature_extractor: str,
    weights: FeatureWeights | str | os.PathLike | None,
    *,
    cache_root: str | os.PathLike | None = None,
) -> FeatureWeights:
    """Already-verified weights as they are (checked to be for this extractor), a path read and verified now."""
    if isinstance(weights, FeatureWeights):
        if weights.extractor != feature_extractor:
            raise ValueError(f"weights {weights!r} are for {weights.extractor!r}, not {feature_extractor!r}")
        return weights
    return load_feature_weights(feature_extractor, weights, cache_root=cache_root)
