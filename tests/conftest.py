import os

# DVC telemetry forks a daemon that, offline, litters the temp folder (conventions.md §6).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


import pytest


@pytest.fixture
def single_thread():
    """Tiny models: intra-op threads buy nothing, and when another process keeps the cores busy, OpenMP's
    spin-waiting makes each small op ~100x slower. Modules opt in with `pytestmark`; the setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
