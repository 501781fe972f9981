"""The training engine every training stage uses: device, data parallelism, precision, resume, numerics, logs.

One stage, any number of processes (DESIGN.md "Scale"). A stage builds its networks and a *loss module* (an
`nn.Module` whose forward maps a `Batch` to per-sample losses) and hands them to `Session.train`:

* **Device.** `cuda:LOCAL_RANK` when CUDA is present, else the CPU.
* **Data parallel.** Under torchrun the loss module is wrapped in DDP (nccl on CUDA, gloo on CPU). Update u trains
  the global samples u·B … u·B + B − 1 of the stage's global batch B, whatever the process count: rank r takes the
  contiguous slice [⌊rB/W⌋, ⌊(r+1)B/W⌋) and splits it into micro-batches of the machine-local `micro_batch`
  setting (gradient accumulation; DDP synchronises on the last one only). Each sample's loss is scaled by W/B, so
  DDP's average over ranks is the global batch mean however the batch was cut. All ranks then clip the same
  averaged gradient, take the same Adam step and update the same EMA: the weights stay identical on every rank.
* **Randomness.** Which image, its flip, its time step, its noise and its dropout mask are drawn from the sample's
  own generator (`sferd.methods.draws`, `sferd.nn.dropout`): independent of device, process count and micro-batch.
  What remains is float summation order (per-rank partial sums, accumulation), so 1 and N processes agree within
  float tolerance, not bitwise; a test states the tolerance.
* **Precision.** `precision: bf16` (a spec field, part of the params) runs forward and loss under bf16 autocast
  with fp32 master weights, optimiser state and EMA; `fp32` runs in float32. TF32, `torch.compile` and the loader
  workers are machine-local runtime settings (`sferd.util.runtime`) that never enter params or resume keys.
* **Resume.** Scratch state in `.sferd/scratch/<stage>/` (`sferd.methods.checkpoints`): model, optimiser, EMA and
  log rows every `checkpoint_every` updates, the newest two kept. No RNG state is needed (draws are a function of
  the update count), so a run killed anywhere and resumed ends bitwise equal to an uninterrupted one on the same
  machine and process count.
* **Numerics guard.** A non-finite loss or gradient norm stops the stage naming the update, before the optimiser
  step; the last good checkpoint stays.
* **Writers.** The first process of each node (`Launch.is_writer`) writes checkpoints and outputs; the others
  wait at a barrier and exit.
* **Logs.** Per-update loss, gradient norm, learning rate and images/s, averaged over ≤ 1,000 intervals, as a TSV
  declared as a DVC plot (kept out of the model's output folder: it holds wall-clock figures).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from sferd.data.arrays import to_model_range
from sferd.methods.checkpoints import CheckpointStore, input_fingerprints, resume_key
from sferd.methods.draws import SampleDraws
from sferd.nn.dropout import sample_keys
from sferd.util.artifacts import atomic_write_text
from sferd.util.distributed import Launch, launch, process_group
from sferd.util.errors import StageError
from sferd.util.machine import machine_record
from sferd.util.progress import Progress
from sferd.util.runtime import Runtime, apply_backend_flags, runtime_settings

# Streams of the per-sample generators: data choice (index, flip) apart from the loss's draws, so a loader can
# prefetch batches without touching the generators the loss uses.
DATA_STREAM = 0x5EED_DA7A
LOSS_STREAM = 0x5EED_1055
LOG_ROWS = 1000  # at most this many rows in a training log, whatever the number of updates


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG: only code outside the engine's per-sample draws uses it (none in training)."""
    torch.manual_seed(seed)


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


@dataclass
class Batch:
    """One micro-batch as the loss module sees it: clean data on the device, labels, the samples' loss draws."""

    x0: torch.Tensor
    y: torch.Tensor | None
    draws: SampleDraws


class Source(Protocol):
    """Training data: `len()` items; `batches(plan, device)` yields (x, y) per planned micro-batch."""

    def __len__(self) -> int: ...

    def batches(self, plan: Iterator[tuple[list[int], int, int]], device: torch.device,
                workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...


def _data_choice(seed: int, indices: Sequence[int], n: int, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    d = SampleDraws(seed, DATA_STREAM, indices)
    idx = d.randint(0, n).numpy()
    flips = (d.rand() < 0.5).numpy() if flip else None
    return idx, flips


class _Gather(torch.utils.data.Dataset):
    """Map-style view for a DataLoader: an item is one planned micro-batch, fetched as uint8 (workers stay light;
    the conversion to float happens on the device)."""

    def __init__(self, split: Any, seed: int, flip: bool, conditional: bool):
        self.split, self.seed, self.flip, self.conditional = split, seed, flip, conditional

    def __len__(self) -> int:  # pragma: no cover - the sampler drives iteration
        return 0

    def __getitem__(self, item: tuple[list[int], int, int]):
        indices = item[0]
        idx, flips = _data_choice(self.seed, indices, len(self.split), self.flip)
        images = torch.from_numpy(np.ascontiguousarray(self.split.gather(idx)))
        labels = torch.from_numpy(np.array(self.split.labels[idx])).long() if self.conditional else None
        return images, (torch.from_numpy(flips) if flips is not None else None), labels


class ImageSource:
    """uint8 N×H×W×C images (a memory-mapped split: anything with `gather(idx)`, `labels` and `len()`), batched
    without materialising the split, turned into [-1, 1] floats on the device, flipped there."""

    def __init__(self, split: Any, *, seed: int, flip: bool, conditional: bool):
        self.split, self.seed, self.flip, self.conditional = split, seed, flip, conditional

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, plan, device, workers):
        loader = torch.utils.data.DataLoader(
            _Gather(self.split, self.seed, self.flip, self.conditional), batch_size=None, sampler=plan,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
        )
        for images, flips, labels in loader:
            x = to_model_range(images, device)
            if flips is not None:
                m = flips.to(device)[:, None, None, None]
                x = torch.where(m, x.flip(-1), x)
            yield x, (labels.to(device, non_blocking=True) if labels is not None else None)


class TensorSource:
    """Rows of an in-memory tensor (the latent prior's normalised codes), with optional labels."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, *, seed: int):
        self.data, self.labels, self.seed = data, labels, seed

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, plan, device, workers):
        data = self.data.to(device)
        labels = self.labels.to(device) if self.labels is not None else None
        for indices, _, _ in plan:
            idx, _ = _data_choice(self.seed, indices, len(self.data), False)
            i = torch.from_numpy(idx).to(device)
            yield data[i], (labels[i] if labels is not None else None)


class _Plan(torch.utils.data.Sampler):
    """The micro-batches of updates start … updates−1 on this rank: (global sample indices, update, chunk)."""

    def __init__(self, start: int, updates: int, batch_size: int, lo: int, hi: int, micro: int):
        self.start, self.updates, self.batch_size, self.lo, self.hi, self.micro = start, updates, batch_size, lo, hi, micro

    def chunks(self) -> list[range]:
        return [range(s, min(s + self.micro, self.hi)) for s in range(self.lo, self.hi, self.micro)]

    def __iter__(self):
        chunks = self.chunks()
        for step in range(self.start, self.updates):
            for c, chunk in enumerate(chunks):
                yield [step * self.batch_size + j for j in chunk], step, c

    def __len__(self) -> int:
        return (self.updates - self.start) * len(self.chunks())


class Session:
    """One training stage in one process of its launch: device, process group, settings, writer role.

    Use as a context manager around the whole stage; `train()` runs the loop, `finish()` (called on a clean exit)
    waits for every rank and clears the scratch state once the outputs are written.
    """

    def __init__(self, name: str, params: dict[str, Any], *, proc: Launch | None = None,
                 runtime: Runtime | None = None, root: Path | str = "."):
        self.name, self.params = name, params
        self.proc = proc or launch()
        self.runtime = runtime or runtime_settings()
        self.device = self.proc.device
        self.precision = params.get("precision", "fp32")
        if self.precision not in ("fp32", "bf16"):
            raise StageError(f"precision {self.precision!r} is not one of fp32, bf16; recompile the spec")
        self.store = CheckpointStore(name, root)
        self.root = Path(root)
        self._stack = ExitStack()

    # -- context ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "Session":
        if self.proc.is_writer:
            self.store.lock()
        self._stack.enter_context(process_group(self.proc))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        apply_backend_flags(self.runtime, self.device)
        seed_everything(int(self.params.get("seed", 0)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.barrier()
                if self.proc.is_writer:
                    self.store.clear()
        finally:
            self._stack.close()
            self.store.unlock()

    @property
    def is_writer(self) -> bool:
        return self.proc.is_writer

    def barrier(self) -> None:
        if self.proc.sharded:
            import torch.distributed as dist

            dist.barrier()

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def adam(self, params, *, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
        """Adam (AdamW when a weight decay is given), fused on CUDA (one kernel for all parameters)."""
        kw: dict[str, Any] = {"lr": lr}
        if self.device.type == "cuda":
            kw["fused"] = True
        if weight_decay is None:
            return torch.optim.Adam(params, **kw)
        return torch.optim.AdamW(params, weight_decay=weight_decay, **kw)

    # -- the loop --------------------------------------------------------------------------------------------

    def _resume(self, key: str) -> dict[str, Any] | None:
        """The newest good state of any node's writer (all nodes resume from the same one), on every rank."""
        state = None
        if self.proc.is_writer:
            self.store.clean_temporaries()
            state = self.store.load_latest(key)
        if not self.proc.sharded:
            return state
        import torch.distributed as dist

        steps: list[Any] = [None] * self.proc.world_size
        dist.all_gather_object(steps, int(state["step"]) if state is not None else -1)
        src = max(range(len(steps)), key=lambda r: (steps[r], -r))
        if steps[src] < 0:
            return None
        box = [state if self.proc.rank == src else None]
        dist.broadcast_object_list(box, src=src, weights_only=True)
        return box[0]

    def train(
        self,
        *,
        module: torch.nn.Module,
        trainable: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        source: Source,
        batch_size: int,
        updates: int,
        lr_lambda: Callable[[int], float],
        grad_clip_norm: float | None,
        checkpoint_every: int,
        seed: int,
        stream: int,
        ema: EMA | None = None,
        log_path: str | None = None,
    ) -> dict[str, Any]:
        """Run `updates` updates of `trainable` (inside `module`) on global batches of `batch_size`."""
        proc, rt = self.proc, self.runtime
        w = proc.world_size
        if batch_size < w:
            raise StageError(f"global batch {batch_size} is smaller than the {w} processes; launch fewer processes")
        lo, hi = batch_size * proc.rank // w, batch_size * (proc.rank + 1) // w
        micro = rt.micro_batch or (hi - lo)

        # the writers hash the stage's inputs (they alone load and save states); the others need no key
        key = resume_key(self.params, input_fingerprints(self.params, self.root)) if proc.is_writer else ""
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        start, recent, rows = 0, [], []
        state = self._resume(key)
        if state is not None:
            trainable.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.model.load_state_dict(state["ema"])
            start, recent, rows = int(state["step"]), list(state["recent"]), [list(r) for r in state["log"]]
            print(f"{self.name}: resuming at update {start}/{updates}", flush=True, file=__import__("sys").stderr)

        def save(step: int) -> None:
            if proc.is_writer:
                self.store.save(step, {
                    "key": key, "step": step, "model": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else {}, "recent": list(recent),
                    "log": [list(r) for r in rows],
                })

        wrapped: torch.nn.Module = module
        if proc.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Buffers are identical on every rank by construction; broadcasting them each step buys nothing.
            wrapped = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                          broadcast_buffers=False)
        forward = torch.compile(wrapped) if rt.compile else wrapped
        trained = [p for p in trainable.parameters() if p.requires_grad]

        plan = _Plan(start, updates, batch_size, lo, hi, micro)
        n_chunks = len(plan.chunks())
        batches = source.batches(iter(plan), self.device, rt.loader_workers)
        log_every = max(1, math.ceil(updates / LOG_ROWS))
        acc = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "t0": time.perf_counter()}
        module.train()
        progress = Progress(self.name, updates, start) if proc.rank == 0 else None
        try:
            for step in range(start, updates):
                scale = lr_lambda(step)
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * scale
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                for c, chunk in enumerate(plan.chunks()):
                    x0, y = next(batches)
                    draws = SampleDraws(seed, stream, [step * batch_size + j for j in chunk], self.device)
                    keys = draws.randint(0, 2**31)
                    sync = nullcontext() if (not proc.sharded or c == n_chunks - 1) else wrapped.no_sync()
                    with sync:
                        with self.autocast(), sample_keys(keys):
                            per_sample = forward(Batch(x0, y, draws)).float()
                        (per_sample.sum() * (w / batch_size)).backward()
                    loss_sum += per_sample.detach().sum().double()
                if proc.sharded:
                    import torch.distributed as dist

                    dist.all_reduce(loss_sum)
                loss = float(loss_sum) / batch_size
                if grad_clip_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, grad_clip_norm))
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, float("inf")))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    kept = self.store.steps()
                    where = f"the last good state (update {kept[0]}) is kept in {self.store.dir}" if kept else \
                        "no state was saved yet"
                    raise StageError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                     f"(loss {loss}, gradient norm {grad_norm}) at update {step}; {where}. "
                                     "Lower the learning rate or check the data.")
                optimizer.step()
                if ema is not None:
                    ema.update(trainable)
                recent.append(loss)
                recent = recent[-200:]
                acc["loss"] += loss
                acc["grad_norm"] += grad_norm
                acc["n"] += 1
                if (step + 1) % log_every == 0 or step + 1 == updates:
                    dt = max(time.perf_counter() - acc["t0"], 1e-9)
                    rows.append([step + 1, acc["loss"] / acc["n"], acc["grad_norm"] / acc["n"],
                                 optimizer.param_groups[0]["lr"], acc["n"] * batch_size / dt])
                    acc = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "t0": time.perf_counter()}
                if progress is not None:
                    progress.update(1, info=f"loss {sum(recent[-50:]) / len(recent[-50:]):.4g}")
                if (step + 1) % checkpoint_every == 0 or step + 1 == updates:
                    save(step + 1)
        finally:
            if progress is not None:
                progress.close()
        if log_path and proc.is_writer:
            write_training_log(log_path, rows)
        final = sum(recent) / len(recent) if recent else None
        # mean training loss over the last (up to 200) updates, and how many that was; and where it was trained
        # (float results differ between CPU models, thread counts and process counts: say which)
        return {"loss_mean_recent": final, "loss_window_updates": len(recent), "updates": updates,
                "machine": machine_record(world_size=proc.world_size, precision=self.precision)}


LOG_COLUMNS = ("update", "loss", "grad_norm", "lr", "images_per_s")


def write_training_log(path: str | Path, rows: list[list[float]]) -> None:
    lines = ["\t".join(LOG_COLUMNS)]
    lines += ["\t".join([str(int(r[0]))] + [f"{v:.6g}" for v in r[1:]]) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


@contextmanager
def session(name: str, params: dict[str, Any]) -> Iterator[Session]:
    with Session(name, params) as s:
        yield s
