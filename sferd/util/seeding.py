"""Seeding of torch's global RNG, shared by every training stage.

Kept below every layer (not in the training loop module) so a stage that trains something small, like the FID
feature network, does not depend on `sferd/methods/training.py`: an edit to the distillation loop must not
retrain the feature network and move every FID number.
"""

from __future__ import annotations


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (dropout); data and noise use their own seeded generators."""
    import torch

    torch.manual_seed(seed)
