"""The feature extractors sferd registers with torch-fidelity: "digits-cnn" (a trained DigitsCNN checkpoint behind
torch-fidelity's API) and "sferd-inception-v3-compat" (torch-fidelity's own InceptionV3, fed verified tensors).

Contract of torch-fidelity 0.4.0 that this class follows (see torch_fidelity/utils.py, registry.py):
- the registry stores the class; `create_feature_extractor` instantiates it as
  `cls(name, features_list, **kwargs)`, where kwargs are *all* keyword arguments given to `calculate_metrics`
  except `cuda` (input1, input2, fid, batch_size, ...), so `__init__` must swallow unknown ones;
- `forward` receives uint8 B x 3 x H x W batches and must return a tuple with one tensor per requested feature,
  in the order of `features_list` (`convert_features_tuple_to_dict` zips them and checks `type(...) is tuple`);
- `register_feature_extractor` raises on a name that is already registered, hence the guard below.

Both take `feature_extractor_weights_path` as a `FeatureWeights` (sferd.metrics.weights): weights read once, whose
SHA-256 and weights_only load apply to the very bytes the extractor is built from. torch-fidelity's stock
"inception-v3-compat" would instead open the path again with `torch.load(weights_only=False)`.
"""

from __future__ import annotations

import io
import os

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from sferd.metrics.keys import EXTRACTOR_DIGITS_CNN, EXTRACTOR_INCEPTION
from sferd.metrics.weights import FeatureWeights, load_feature_weights
from sferd.nn.digits_cnn import digits_cnn_from_checkpoint, to_model_input

# Registry name of the verified Inception: the network and its features are torch-fidelity's "inception-v3-compat"
# (that is the name metrics files record); only the way the weights arrive differs.
EXTRACTOR_INCEPTION_VERIFIED = "sferd-inception-v3-compat"

FEATURE_POOL = "pool"
FEATURE_LOGITS = "logits"

_DTYPES = {None: torch.float32, "float32": torch.float32, "float64": torch.float64}


class FeatureExtractorDigitsCNN(FeatureExtractorBase):
    """Features "pool" (B x feature_dim, used by FID/KID/PRC) and "logits" (B x 10, used by ISC) of a DigitsCNN."""

    def __init__(
        self,
        name,
        features_list,
        feature_extractor_weights_path=None,
        feature_extractor_internal_dtype=None,
        **kwargs,
    ):
        super().__init__(name, features_list)
        weights = feature_extractor_weights_path
        vassert(
            weights is not None,
            f"Feature extractor {name!r} needs feature_extractor_weights_path: a checkpoint written by "
            f"sferd.nn.digits_cnn.save_digits_cnn (nothing can be downloaded for it)",
        )
        if not isinstance(weights, FeatureWeights):  # a path, as torch-fidelity's own callers pass it
            vassert(os.path.isfile(weights), f"Feature extractor {name!r}: weights file {weights} does not exist")
            weights = load_feature_weights(EXTRACTOR_DIGITS_CNN, weights)
        vassert(weights.extractor == EXTRACTOR_DIGITS_CNN, f"{weights!r} are not digits-cnn weights")
        # Own dtype table: torch-fidelity 0.4.0's helpers.text_to_dtype maps "float64" to torch.float32.
        vassert(
            feature_extractor_internal_dtype in _DTYPES,
            f"Unsupported feature_extractor_internal_dtype {feature_extractor_internal_dtype!r}",
        )
        self.internal_dtype = _DTYPES[feature_extractor_internal_dtype]
        self.net = digits_cnn_from_checkpoint(weights.state, source=weights.path).to(self.internal_dtype)
        self.resolution = self.net.resolution
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return FEATURE_POOL, FEATURE_LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": FEATURE_LOGITS, "fid": FEATURE_POOL, "kid": FEATURE_POOL, "prc": FEATURE_POOL}[metric]

    @staticmethod
    def can_be_compiled():
        # A few small convolutions: compilation would cost more than it saves, and it may perturb the numbers.
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
        # No resizing: the CNN was trained at one resolution, and features of resampled images would not be
        # comparable with those of the reference set.
        vassert(
            tuple(x.shape[2:]) == (self.resolution, self.resolution),
            f"digits-cnn weights are for {self.resolution}x{self.resolution} images, got {tuple(x.shape[2:])}",
        )
        x = x.to(self.internal_dtype)
        if self.net.channels == 1:
            # Grey images arrive replicated to RGB; the channel mean undoes that exactly (3v/3 == v in float) and
            # still gives a sensible grey for genuinely coloured input.
            x = x.mean(dim=1, keepdim=True)
        pool = self.net.features(to_model_input(x))
        out = {FEATURE_POOL: pool}
        if FEATURE_LOGITS in self.features_list:
            out[FEATURE_LOGITS] = self.net.classifier(pool)
        return tuple(out[name] for name in self.features_list)


class VerifiedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (same layers, same forward, same features) built from a `FeatureWeights`.

    The parent's constructor can only take weights through `torch.load(feature_extractor_weights_path,
    weights_only=False)`. It is handed an in-memory buffer that `torch.save` wrote from the verified name → tensor
    dict: its full unpickler then reads bytes this process produced from plain tensors, never the user's file,
    and the path is not opened again (nothing on disk can change in between). A path is refused outright.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        weights = feature_extractor_weights_path
        vassert(
            isinstance(weights, FeatureWeights) and weights.extractor == EXTRACTOR_INCEPTION,
            f"Feature extractor {name!r} takes inception-v3-compat weights loaded by "
            f"sferd.metrics.weights.load_feature_weights, not {weights!r} (a path would be unpickled in full)",
        )
        buf = io.BytesIO()
        torch.save(dict(weights.state), buf)
        buf.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buf, **kwargs)


def _register(name: str, cls: type) -> str:
    """Register `cls` under `name` once per process (repeat calls are no-ops); return the name."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is cls:
        return name
    if existing is not None:
        same_origin = (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        if not same_origin:
            raise RuntimeError(f"torch-fidelity extractor name {name!r} is taken by {existing!r}")
        # This module was re-imported (importlib.reload, test isolation): point the entry at the live class.
        # register_feature_extractor refuses existing names, so the registry dict is updated directly.
        FEATURE_EXTRACTORS_REGISTRY[name] = cls
        return name
    register_feature_extractor(name, cls)
    return name


def register_digits_extractor() -> str:
    """Register "digits-cnn" with torch-fidelity once per process (repeat calls are no-ops); return the name."""
    return _register(EXTRACTOR_DIGITS_CNN, FeatureExtractorDigitsCNN)


def registered_name(feature_extractor: str) -> str:
    """The torch-fidelity registry name sferd measures `feature_extractor` ("digits-cnn", "inception-v3-compat")
    with, registered on first use. Both take `FeatureWeights` as `feature_extractor_weights_path`."""
    if feature_extractor == EXTRACTOR_DIGITS_CNN:
        return register_digits_extractor()
    if feature_extractor == EXTRACTOR_INCEPTION:
        return _register(EXTRACTOR_INCEPTION_VERIFIED, VerifiedInceptionV3)
    raise ValueError(f"no sferd extractor for {feature_extractor!r}")
