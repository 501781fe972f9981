"""A small CNN classifier on the (upsampled) scikit-learn digits, used as the quickstart's FID feature network
(and, with 3 input channels, as the offline feature network of paper specs run at smoke scale).

Inception-v3 weights cannot be downloaded offline, and Inception features of 8x8 digits blown up to 299x299 say
little anyway. A classifier trained on the digits themselves gives a feature space (the pooled penultimate layer,
"pool") in which class structure and stroke statistics matter, which is what FID needs to rank samplers.

The checkpoint format is shared by the training stage (writer) and the torch-fidelity extractor (reader), so both
helpers live here, next to the model, and import nothing from torch-fidelity.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sferd.util.artifacts import torch_save

NUM_CLASSES = 10
CONFIG_KEYS = ("resolution", "feature_dim", "width")
OPTIONAL_CONFIG = {"channels": 1}  # files written before colour input existed are grey-scale networks


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """Map pixel values in 0..255 (uint8 or float) to the float range [-1, 1] the network is trained on.

    The training stage and the FID extractor must use one and the same mapping, otherwise the features of
    reference images and of samples would be computed on differently scaled inputs.
    """
    x = pixels if pixels.is_floating_point() else pixels.to(torch.float32)
    return x / 127.5 - 1.0


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm (not BatchNorm) keeps each image's features independent of the other images in its batch, so the
    # FID does not depend on the evaluation batch size; gcd keeps the group count a divisor of any width.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        _norm(c_out),
        nn.SiLU(),
    )


class DigitsCNN(nn.Module):
    """Conv/GroupNorm/SiLU stack, global average pool to `feature_dim` ("pool" features), Linear to 10 logits.

    Input: float B x C x R x R in [-1, 1] (C = 1 for digits, 3 for colour images), R a power of two >= 8.
    Stride-2 convolutions bring every resolution down to 4x4 before pooling, so the receptive field covers the
    whole digit whatever R is and the parameter count barely depends on R.
    """

    def __init__(self, resolution: int, feature_dim: int = 64, width: int = 32, channels: int = 1):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"DigitsCNN resolution must be a power of two >= 8, got {resolution}")
        if feature_dim < 1 or width < 1:
            raise ValueError(f"DigitsCNN feature_dim and width must be positive, got {feature_dim}, {width}")
        self.resolution = int(resolution)
        self.feature_dim = int(feature_dim)
        self.width = int(width)
        if channels not in (1, 3):
            raise ValueError(f"DigitsCNN takes 1 (grey) or 3 (RGB) channels, got {channels}")
        self.channels = int(channels)

        layers: list[nn.Module] = [_conv_block(channels, width), _conv_block(width, width)]
        channels, size = width, resolution
        while size > 4:
            layers.append(_conv_block(channels, 2 * width, stride=2))
            channels, size = 2 * width, size // 2
        layers.append(_conv_block(channels, feature_dim))
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(feature_dim, NUM_CLASSES)

    @property
    def config(self) -> dict[str, int]:
        return {"resolution": self.resolution, "feature_dim": self.feature_dim, "width": self.width,
                "channels": self.channels}

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DigitsCNN expects B x {' x '.join(map(str, expected))} input, got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate activations, B x feature_dim: the FID feature ("pool")."""
        self._check_input(x)
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def save_digits_cnn(path: str | os.PathLike, model: DigitsCNN, *, config: dict[str, Any]) -> None:
    """Write `{"state_dict", "config"}`; `config` may carry extra plain-data fields (e.g. held-out accuracy).

    The architecture fields are checked against the model, because a mismatch would only surface later as a
    confusing state_dict error inside torch-fidelity.
    """
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"save_digits_cnn: config lacks {missing} (needs {list(CONFIG_KEYS)})")
    wrong = {k: (config.get(k, OPTIONAL_CONFIG.get(k)), v) for k, v in model.config.items()
             if int(config.get(k, OPTIONAL_CONFIG.get(k))) != v}
    if wrong:
        raise ValueError(f"save_digits_cnn: config disagrees with the model (config, model): {wrong}")
    # Tensors are cloned to CPU so the file never records a device and loads under weights_only=True anywhere.
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    torch_save(path, {"state_dict": state, "config": dict(config)})  # atomic: never a half-written file


def digits_cnn_from_checkpoint(blob: Any, *, source: str | os.PathLike = "checkpoint") -> DigitsCNN:
    """Rebuild a DigitsCNN from an already loaded `save_digits_cnn` checkpoint (CPU, eval mode, no gradients).

    Separate from reading the file so that a caller who verified the file's bytes (sferd.metrics.weights) builds
    the network from exactly those bytes instead of opening the path again."""
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{source}: not a DigitsCNN checkpoint (expected keys 'state_dict' and 'config')")
    config = blob["config"]
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{source}: checkpoint config lacks {missing}")
    model = DigitsCNN(**{k: int(config[k]) for k in CONFIG_KEYS},
                      **{k: int(config.get(k, default)) for k, default in OPTIONAL_CONFIG.items()})
    model.load_state_dict(blob["state_dict"])
    model.requires_grad_(False)
    model.eval()
    return model


def load_digits_cnn(path: str | os.PathLike) -> DigitsCNN:
    """Rebuild a DigitsCNN from a `save_digits_cnn` file (CPU, eval mode, no gradients)."""
    # weights_only=True: a checkpoint is data, loading it must not be able to execute code.
    blob = torch.load(os.fspath(path), weights_only=True, map_location="cpu")
    return digits_cnn_from_checkpoint(blob, source=path)
