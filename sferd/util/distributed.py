"""One stage, several processes: what a `torchrun` launch looks like from inside a stage (FID sampling shards).

Nobody types torchrun: every stage's command is the launcher (`python -m sferd.pipeline.launch`), which starts
`torchrun` itself when the machine-local runtime setting asks for more than one process
(`SFERD_NPROC_PER_NODE` / `sferd.local.toml`, see `sferd.util.runtime`), and only for stage kinds that shard;
`dvc repro` then records the stage as for any other run, with no manual commit. The process count is no part of
the stage's params, so `dvc.lock` is the same for 1 or N processes.

The stage runner needs no flag: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK and `launch()` reads them; a
plain `python -m sferd.pipeline.run` (WORLD_SIZE unset or 1) is one process with no process group at all.
Sharding never changes a result: rank r samples whole batches of the one-process batch list and rank 0 puts
them back in seed order (`shard_slices`, `merge_shards`), so samples.npz is byte-identical for any number of
processes on the same kind of device. A stage kind that does not shard must refuse WORLD_SIZE > 1 itself (under
torchrun every rank would run the whole stage and race on its outputs): the launcher only launches.

The process group (nccl with CUDA, else gloo) is opened once per stage by `process_group()` and closed right
after the gather, so rank 0 can go on alone (FID, writing outputs) while the other ranks exit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from sferd.util.errors import StageError


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch: rank `rank` of `world_size`, GPU `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """The process that writes this node's files: local rank 0. On one node that is rank 0 alone; with several
        nodes each node runs `dvc repro` in its own clone, so each node's first process writes the (identical)
        outputs its DVC expects."""
        return self.local_rank == 0

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def device(self):
        """cuda:LOCAL_RANK when CUDA is available, else CPU. One rule for 1 and N processes: a 1-process run and
        an 8-process run on the same machine then sample on the same kind of device and agree byte for byte."""
        import torch

        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise StageError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {key} is not: launch with torchrun") from None
    except ValueError:
        raise StageError(f"{key}={env[key]!r} is not an integer") from None


def launch(env: dict[str, str] | None = None) -> Launch:
    """The launch described by torchrun's environment variables; one process when WORLD_SIZE is unset or 1."""
    env = dict(os.environ if env is None else env)
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return Launch()
    world_size = _env_int(env, "WORLD_SIZE")
    rank, local_rank = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    local_world_size = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    if not 0 <= rank < world_size:
        raise StageError(f"RANK={rank} is outside 0 … {world_size - 1}")
    if not 0 <= local_rank < local_world_size <= world_size:
        raise StageError(f"LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world_size} do not fit WORLD_SIZE={world_size}")
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size)


@contextmanager
def process_group(proc: Launch) -> Iterator[None]:
    """Join the torchrun process group for the block; a no-op for one process.

    Closed on the way out (also on an error: the failing rank then exits and torchrun stops the others, so no
    rank is left waiting), because rank 0 carries on alone after the gather and must not hold a group whose
    other members have exited.
    """
    import torch
    import torch.distributed as dist

    if not proc.sharded or dist.is_initialized():  # nothing to do, or a caller already owns the group
        yield
        return
    if proc.device.type == "cuda":
        torch.cuda.set_device(proc.device)  # NCCL's object collectives stage through the current device
    dist.init_process_group(backend="nccl" if proc.device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_to_main(proc: Launch, shard: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's `shard` (a dict of tensors) in rank order on rank 0, None on the others.

    A collective rather than shard files in a shared folder: it works across nodes without a shared
    filesystem and leaves nothing on disk to clean up when a rank fails. At FID sizes (≤ 50k small uint8
    images, at most a few hundred MB in all) one pickled gather is cheap next to the sampling. Received
    objects are unpickled with weights_only=True, as every file this project reads.
    """
    if not proc.sharded:
        return [shard]
    import torch.distributed as dist

    gathered: list[dict[str, Any]] | None = [{}] * proc.world_size if proc.is_main else None
    dist.gather_object(shard, gathered, dst=0, weights_only=True)
    return gathered


def shard_slices(n: int, batch_size: int, rank: int, world_size: int) -> list[slice]:
    """The batches of positions 0 … n−1 that `rank` samples: a contiguous block of the one-process batches.

    Whole batches of the one-process split, not a re-split of the rank's share: every image then comes out of
    a batch with the same members as in a 1-process run, so batch-size-dependent kernels cannot make the
    result depend on the number of processes. Ranks get ⌊B/W⌋ or ⌈B/W⌉ of the B batches.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    starts = range(0, n, batch_size)
    lo, hi = len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size
    return [slice(s, min(s + batch_size, n)) for s in starts[lo:hi]]


def merge_shards(shards: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Concatenate the ranks' arrays and put their rows back in position order (each shard's `positions`).

    Refuses anything but every position 0 … n−1 exactly once: a lost or doubled batch must not turn into a
    plausible-looking sample set.
    """
    positions = np.concatenate([np.asarray(s["positions"], dtype=np.int64) for s in shards])
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(positions[order], np.arange(n)):
        raise RuntimeError(f"the shards cover {len(positions)} positions ({len(np.unique(positions))} distinct), "
                           f"not each of the {n} samples exactly once")
    keys = [k for k in shards[0] if k != "positions"]
    return {k: np.concatenate([np.asarray(s[k]) for s in shards])[order] for k in keys}


def share_with_node_writers(proc: Launch, obj: Any) -> Any:
    """Rank 0's `obj` on the first process of every node (None on the other ranks); a no-op on one node.

    With several nodes each node runs `dvc repro` in its own clone, so each node's first process must write the
    same outputs (Launch.is_writer). Only those processes receive the object: a subgroup, so the other ranks of a
    node do not each hold a copy of, say, 50k gathered samples. Every rank must call this (new_group is collective).
    """
    if not proc.multi_node:
        return obj if proc.is_main else None
    import torch.distributed as dist

    local_ranks: list[Any] = [None] * proc.world_size
    dist.all_gather_object(local_ranks, proc.local_rank)
    writers = [r for r, lr in enumerate(local_ranks) if lr == 0]
    group = dist.new_group(ranks=writers)
    if not proc.is_writer:
        return None
    box = [obj if proc.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group, weights_only=True)
    return box[0]
