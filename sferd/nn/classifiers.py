"""Classifiers for CFD (Sun et al., ICME 2023; baselines.md §4): the frozen C whose pooled penultimate feature f and
class logits p the CFD loss compares (sferd/methods/cfd.py).

Every classifier here takes images in the model range [-1, 1] (what the diffusion models produce) and returns
(logits, feature):

- `digits-cnn`: the quickstart's small CNN (sferd/nn/digits_cnn.py), trained by its own stage with its own seed.
- `resnet18`, `densenet201`: torchvision's constructors with the stem adapted to 32×32 inputs as the CIFAR recipe
  does (a 3×3 stride-1 first convolution, no max-pool), trained from scratch. BatchNorm is replaced by GroupNorm:
  BatchNorm's training statistics depend on how a batch is split over processes and micro-batches, which the
  suite's training engine guarantees does not matter (a stated deviation from RCFD, which trains with BatchNorm).
- `pretrained`: torchvision's ImageNet weights from a local file; the image is mapped to [0, 1], upsampled
  (bilinear) to the file's input size and normalised with ImageNet's mean and std, as torchvision's transforms do.

A checkpoint is `{"state_dict", "config"}` (plain tensors and data, loaded with weights_only=True).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("digits-cnn", "resnet18", "densenet201")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's densenet files predate '.'-free module names (`norm.1` for `norm1`); torchvision renames the same way
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _swap_batch_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _group_norm(child.num_features))
        else:
            _swap_batch_norm(child)


class Classifier(nn.Module):
    """(logits, pooled feature) of a body + linear head, with the input mapping of its training."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        import torchvision

        self.config = dict(config)
        arch, k = config["architecture"], int(config["num_classes"])
        pretrained = bool(config.get("pretrained", False))
        self.input_resolution = int(config.get("input_resolution") or config["resolution"])
        if pretrained:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if arch == "digits-cnn":
            from sferd.nn.digits_cnn import NUM_CLASSES, DigitsCNN

            if k != NUM_CLASSES:
                raise ValueError(f"digits-cnn has {NUM_CLASSES} classes, not {k}")
            self.net = DigitsCNN(int(config["resolution"]), feature_dim=int(config["feature_dim"]),
                                 width=int(config["width"]), channels=int(config["channels"]))
        elif arch == "resnet18":
            if pretrained:
                self.net = torchvision.models.resnet18(num_classes=k)
            else:
                self.net = torchvision.models.resnet18(num_classes=k, norm_layer=_group_norm)
                self.net.conv1 = nn.Conv2d(int(config["channels"]), 64, kernel_size=3, stride=1, padding=1, bias=False)
                self.net.maxpool = nn.Identity()
        elif arch == "densenet201":
            self.net = torchvision.models.densenet201(num_classes=k)
            if not pretrained:
                self.net.features.conv0 = nn.Conv2d(int(config["channels"]), 64, kernel_size=3, stride=1, padding=1,
                                                    bias=False)
                self.net.features.pool0 = nn.Identity()
                _swap_batch_norm(self.net)
        else:
            raise ValueError(f"unknown classifier architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
        self.architecture, self.pretrained = arch, pretrained

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pretrained:
            return x
        x = (x + 1.0) / 2.0
        if x.shape[-1] != self.input_resolution:
            x = F.interpolate(x, size=(self.input_resolution, self.input_resolution), mode="bilinear",
                              align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._prepare(x)
        net = self.net
        if self.architecture == "digits-cnn":
            f = net.features(x)
            return net.classifier(f), f
        if self.architecture == "resnet18":
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
            f = torch.flatten(net.avgpool(h), 1)
            return net.fc(f), f
        f = torch.flatten(F.adaptive_avg_pool2d(F.relu(net.features(x)), 1), 1)  # torchvision's DenseNet.forward
        return net.classifier(f), f


def classifier_config(*, architecture: str, channels: int, resolution: int, num_classes: int,
                      width: int | None = None, feature_dim: int | None = None, pretrained: bool = False,
                      input_resolution: int | None = None) -> dict[str, Any]:
    """The build config a classifier checkpoint records (and its loader rebuilds from)."""
    cfg: dict[str, Any] = {"architecture": architecture, "channels": channels, "resolution": resolution,
                           "num_classes": num_classes, "pretrained": pretrained}
    if architecture == "digits-cnn":
        cfg.update(width=width or 32, feature_dim=feature_dim or 64)
    if pretrained:
        cfg["input_resolution"] = input_resolution
    return cfg


def torchvision_state_dict(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """A torchvision weights file's state_dict with densenet's old key names renamed (as torchvision does)."""
    if architecture != "densenet201":
        return dict(state)
    out = {}
    for key, v in state.items():
        m = _OLD_DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = v
    return out


def save_classifier(path: str | os.PathLike, model: Classifier, extra: dict[str, Any] | None = None) -> None:
    from sferd.util.artifacts import torch_save

    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    torch_save(path, {"state_dict": state, "config": {**model.config, **(extra or {})}})


def load_classifier(path: str | os.PathLike, *, expect: dict[str, Any] | None = None) -> Classifier:
    """A frozen classifier (eval mode, no parameter gradients) from `save_classifier`'s file; `expect`: build-config
    fields the file must record (the stage's params), so a classifier of another dataset is refused by name."""
    blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path}: not a classifier checkpoint (expected keys 'state_dict' and 'config')")
    cfg = blob["config"]
    wrong = [f"{k} {cfg.get(k)!r} (expected {v!r})" for k, v in (expect or {}).items() if cfg.get(k) != v]
    if wrong:
        raise ValueError(f"{path}: classifier for another set-up: {', '.join(wrong)}")
    model = Classifier(cfg)
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)
