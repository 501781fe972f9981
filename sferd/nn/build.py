"""Build networks from the resolved model config a stage receives (a plain dict from params.json)."""

from __future__ import annotations

from typing import Any

from sferd.nn.unet import UNet, UNetConfig


def unet_config(model: dict[str, Any]) -> UNetConfig:
    return UNetConfig(
        in_channels=model["in_channels"],
        out_channels=model["out_channels"],
        resolution=model["resolution"],
        base_channels=model["base_channels"],
        channel_mult=tuple(model["channel_mult"]),
        num_res_blocks=model["num_res_blocks"],
        attention_resolutions=tuple(model["attention_resolutions"]),
        num_heads=model["num_heads"],
        head_channels=model["head_channels"],
        dropout=model["dropout"],
        num_classes=model["num_classes"],
        norm_groups=model["norm_groups"],
    )


def build_unet(model: dict[str, Any]) -> UNet:
    return UNet(unet_config(model))
