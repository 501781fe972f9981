"""Shared machinery of every training stage: EMA, learning-rate schedules, a resumable loop, progress.

Resume (DESIGN.md: "resume after a crash gives the same result"): the loop saves model, EMA, optimiser,
data-sampler RNG, torch RNG and the update count every `checkpoint_every` updates, atomically. A restarted
stage with the *same* config continues from there; with a different config it starts over (the persisted
directory is the stage's own scratch space, its final `model.pt` is written only at the end).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from sferd.util.artifacts import torch_load, torch_save
from sferd.util.errors import StageError
from sferd.util.progress import Progress
from sferd.util.seeding import seed_everything  # noqa: F401  (moved to util; re-exported for the stages)


class EMA:
    """Exponential moving average of parameters (buffers copied). The EMA weights are what PD distils."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def warmup_constant(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def linear_to_zero(total: int) -> Callable[[int], float]:
    """PD's per-halving schedule: lr decays linearly from its peak to 0 over the halving."""
    return lambda step: max(0.0, 1.0 - step / total)


def train_loop(
    *,
    label: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_lambda: Callable[[int], float],
    loss_fn: Callable[[int], torch.Tensor],
    updates: int,
    grad_clip_norm: float,
    state_path: Path,
    config: dict,
    checkpoint_every: int,
    rng_objects: dict[str, torch.Generator],
    ema: EMA | None = None,
) -> dict[str, float]:
    """Run `updates` optimiser updates, resuming from `state_path` when its config matches.

    `loss_fn(step)` returns the scalar loss of one batch. Returns summary statistics for the metrics file.
    """
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    start = 0
    recent: list[float] = []
    if state_path.is_file():
        state = torch_load(state_path)
        if state.get("config") == config:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.model.load_state_dict(state["ema"])
            for k, g in rng_objects.items():
                g.set_state(state["rng"][k])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["step"])
            recent = list(state.get("recent_losses", []))
            print(f"{label}: resuming at update {start}/{updates}", file=sys.stderr)
        else:
            print(f"{label}: saved state is for another config; starting over", file=sys.stderr)
            state_path.unlink()

    def save(step: int) -> None:
        torch_save(
            state_path,
            {
                "config": config,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else {},
                "rng": {k: g.get_state() for k, g in rng_objects.items()},
                "torch_rng": torch.get_rng_state(),
                "recent_losses": list(recent),
            },
        )

    model.train()
    progress = Progress(label, updates, start)
    try:
        for step in range(start, updates):
            scale = lr_lambda(step)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * scale
            loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise StageError(
                    f"non-finite loss ({loss.item()}) at update {step}; the last good state is kept in {state_path}. "
                    "Lower the learning rate or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            recent.append(loss.item())
            recent = recent[-200:]
            progress.update(1, info=f"loss {sum(recent[-50:]) / len(recent[-50:]):.4g}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < updates:
                save(step + 1)
    finally:
        progress.close()
    # Keep the final state too, so a re-run of an identical config is a no-op resume.
    save(updates)
    final = sum(recent) / len(recent) if recent else None
    # mean training loss over the last (up to 200) updates of this run, and how many that was
    return {"loss_mean_recent": final, "loss_window_updates": len(recent), "updates": updates}
