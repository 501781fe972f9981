"""Figures beside each table: FID against sampling steps (PNG + CSV for `dvc plots`) and a sample grid per
evaluated model (DESIGN.md step 6). Matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sferd.util.artifacts import atomic_write_bytes, atomic_write_text

GRID_SIDE = 8  # 8 × 8 = the first 64 samples (seeds sample_seed_start … +63)
MIN_GRID_PIXELS = 256  # small images are upscaled (nearest) so a grid is readable


def fid_series(df: pd.DataFrame) -> pd.DataFrame:
    """Long table (model, steps, fid, n) of the measured model rows, FID averaged over seeds."""
    rows = df[df["steps"].notna() & df["present"]]
    if rows.empty:
        return pd.DataFrame(columns=["model", "steps", "fid", "n"])
    out = rows.groupby(["label", "steps"], sort=False)["fid"].agg(["mean", "count"]).reset_index()
    out.columns = ["model", "steps", "fid", "n"]
    out["steps"] = out["steps"].astype(int)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def plain_text(text: str) -> str:
    """Spec text (a title, a row label) for matplotlib, shown as written: a `$` would start mathtext, and `$\\frac{$`
    in a label stopped the render stage with a parse error. An escaped `\\$` is a literal dollar sign."""
    return str(text).replace("$", "\\$")


def write_fid_plot(series: pd.DataFrame, png: str | Path, csv: str | Path, title: str) -> None:
    plt = _pyplot()
    atomic_write_text(csv, series.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for model, g in series.groupby("model", sort=False):
        g = g.sort_values("steps")
        ax.plot(g["steps"], g["fid"], marker="o", label=plain_text(model))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # 1-step teachers sit an order of magnitude above the students
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(plain_text(title), fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(series):
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: byte-stable output
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def sample_grid(images: np.ndarray, side: int = GRID_SIDE) -> np.ndarray:
    """uint8 N×H×W×C → one uint8 grid image of the first side² samples (1-px black gutters), upscaled."""
    n = min(len(images), side * side)
    if n == 0:
        raise ValueError("no images for a grid")
    h, w, c = images.shape[1:]
    cols = min(side, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = images[k]
    scale = max(1, -(-MIN_GRID_PIXELS // grid.shape[1]))
    return grid.repeat(scale, 0).repeat(scale, 1)


def write_sample_grid(samples_npz: str | Path, png: str | Path) -> None:
    plt = _pyplot()
    with np.load(samples_npz, allow_pickle=False) as z:
        images = z["images"][: GRID_SIDE * GRID_SIDE]
    grid = sample_grid(images)
    buf = io.BytesIO()
    if grid.shape[-1] == 1:
        plt.imsave(buf, grid[..., 0], cmap="gray", vmin=0, vmax=255, format="png", metadata={"Software": None})
    else:
        plt.imsave(buf, grid, format="png", metadata={"Software": None})
    os.makedirs(Path(png).parent, exist_ok=True)
    atomic_write_bytes(png, buf.getvalue())
