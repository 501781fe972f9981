import os

# DVC telemetry forks a daemon that, offline, litters the temp folder (conventions.md §6).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# scripts/test runs the suite in pytest-xdist worker processes (`-n auto --dist loadfile`). Each worker gets an
# equal share of the cores for torch's intra-op threads, set here before any test imports torch, and inherited by
# the stage processes the tests spawn (`dvc repro`, torchrun): with 2 workers on 2 cores, torch's default of one
# thread per core would run 4 busy threads on 2 cores, and OpenMP's spin-waiting makes small ops ~100x slower when
# the cores are oversubscribed. No test depends on the thread count (the bitwise-resume tests set one thread
# themselves). An OMP_NUM_THREADS given by the caller is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


import pytest

# Test files by time, longest first: those that spend minutes in one module-scoped fixture (a whole `dvc repro`),
# then the next longest, so the run ends on quick files (seconds from a one-process run, 2026-12-01). Collected
# first, so that with `--dist loadfile` the long ones start first, one per worker, instead of ending the run on one
# worker while the other idles (xdist's own reordering by test count, which scripts/test turns off, would put these
# few-test files last). xdist starts a worker on two files when its first holds at most 2 tests: the worker that
# takes the smoke run's 2 tests also takes the third file, so that one is quick; the other takes e2e, then bundles.
LONGEST_FIRST = (
    "test_smoke_scale.py",  # 366 s
    "test_e2e.py",  # 216 s
    "test_spec_loader.py",  # < 1 s
    "test_bundles.py",  # 146 s
    "test_ddp.py",  # 63 s
    "test_cld_stages.py",  # 54 s
    "test_fuzz_specs.py",  # 39 s
    "test_launch.py",  # 32 s
    "test_stage_memory.py",  # 31 s
    "test_code_fingerprints.py",  # 29 s
    "test_kill_resume.py",  # 29 s
    "test_ablations.py",  # 28 s
    "test_cli.py",  # 26 s
    "test_spec_messages.py",  # 24 s (added since)
    "test_multinode.py",  # 18 s
    "test_guidance.py",  # 17 s
    "test_solver_stages.py",  # 17 s
    "test_shard.py",  # 16 s
    "test_bench_tiny.py",  # 14 s
    "test_bench_noop.py",  # 13 s (added since)
    "test_bench_samplers_tiny.py",  # 12 s
    "test_compile.py",  # 11 s
    "test_cld.py",  # 10 s
    "test_fid.py",  # 10 s
    "test_latent_prior.py",  # 9 s
    "test_bench_cld_tiny.py",  # 9 s
    "test_bench_cfd_tiny.py",  # 8 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a stable sort: the order within a file, and of the other files, is unchanged
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture
def single_thread():
    """Tiny models: intra-op threads buy nothing, and when another process keeps the cores busy, OpenMP's
    spin-waiting makes each small op ~100x slower. Modules opt in with `pytestmark`; the setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def checkout_dvc_lock(tmp_path_factory):
    """For tests that run DVC in this checkout itself rather than in a temporary copy: one at a time across xdist
    workers. `dvc repro`, even with --dry, holds the repository's lock and gives up after waiting 3 s, so two such
    tests on two workers could fail on each other's lock (one process never runs them at once)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # each worker's base folder sits in the run's one
    with open(shared / "checkout-dvc.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield
