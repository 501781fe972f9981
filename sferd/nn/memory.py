"""Per-GPU memory of a U-Net training step, estimated without a GPU (issue 9, item 9; shown by `sferd-spec plan`).

peak(m) ≈ states + fixed + m · per_sample, for a micro-batch of m images:

* **states**: bytes per trained parameter: fp32 weights 4 + fp32 gradients 4 + Adam's two moments 8 + EMA copy 4
  = 20 B (bf16 autocast keeps fp32 master weights, so the same 20 B), plus 4 B per parameter of a frozen fp32
  network the stage also holds (a distillation stage's teacher).
* **activations**: what autograd keeps for the backward pass, measured, not modelled: one forward of the real
  network runs on *fake* CUDA tensors (`torch._subclasses.FakeTensorMode`: shapes, dtypes and the dispatch of CUDA
  tensors, no memory, no GPU) under `torch.autograd.graph.saved_tensors_hooks`, and the hooks sum the bytes of
  every distinct storage saved for backward (a tensor saved by two ops counts once; parameters are states, not
  activations). Two batch sizes give per-sample bytes (the slope) and batch-independent bytes (the intercept:
  e.g. autocast's cached bf16 weight copies). bf16 runs the forward under CUDA autocast, the policy a GPU run
  uses (convolutions and matmuls in bf16, group norm in fp32).
* Attention is counted as a GPU runs it: PyTorch's fused memory-efficient kernel, which saves q, k, v, the output
  and a log-sum-exp, not the N×N map. (Fake CUDA tensors cannot ask the hardware which kernel it has, and would
  fall back to the unfused path; the fused kernel is called directly instead.)

Not counted, hence the headroom (`HEADROOM`): the backward pass's transient activation gradients (about the
largest few activations in flight), the CUDA context and kernels' workspaces (~0.5–1 GiB), allocator
fragmentation, a DDP gradient-bucket copy when `gradient_as_bucket_view` is off (another 4 B per parameter), and a
teacher's no-grad forward (its activations are freed layer by layer). The micro-batch reported as fitting keeps the
estimate within HEADROOM of the stated memory.

The measuring machinery is exact on a device that exists: `saved_tensors(..., device="cpu", fake=True)` lists the
same saved tensors (shapes, dtypes, bytes) as a real CPU forward, which a test checks; only the GPU-kernel
choice above is a model.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

GIB = 1024**3
# trained parameter: fp32 weight + fp32 grad + Adam exp_avg + exp_avg_sq + fp32 EMA copy
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4
FROZEN_BYTES_PER_PARAM = 4
HEADROOM = 0.9  # fit the estimate into 90 % of the GPU's memory (see the module docstring for what it covers)
PRECISIONS = ("fp32", "bf16")

ASSUMPTIONS = (
    "per-GPU memory of one training micro-batch, estimated without a GPU: 20 B per trained parameter (fp32 weights, "
    "grads, Adam moments, EMA; bf16 autocast keeps fp32 masters), 4 B per frozen teacher parameter, plus the "
    "activations autograd saves, measured by one forward on fake CUDA tensors (bf16: under CUDA autocast; attention "
    f"as the fused memory-efficient kernel). The largest micro-batch keeps this within {HEADROOM:.0%} of the stated "
    "memory: the rest is for backward transients, the CUDA context, fragmentation (not counted). Shown for the U-Net "
    "training stages (teacher, halvings); predictor, prior and feature-network stages are not estimated."
)


def _model_key(model: dict[str, Any]) -> str:
    return json.dumps(model, sort_keys=True)


def parameter_count(model: dict[str, Any]) -> int:
    return _parameter_count(_model_key(model))


@lru_cache(maxsize=None)
def _parameter_count(key: str) -> int:
    import torch

    from sferd.nn.build import build_unet

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return sum(p.numel() for p in build_unet(json.loads(key)).parameters())


@contextlib.contextmanager
def _cuda_autocast_bf16() -> Iterator[None]:
    """CUDA autocast switched on directly: `torch.autocast("cuda")` disables itself when no GPU is present, but
    fake CUDA tensors dispatch through the CUDA autocast policy all the same."""
    import torch

    prev_enabled, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev_enabled)
        torch.set_autocast_dtype("cuda", prev_dtype)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Route F.scaled_dot_product_attention to the memory-efficient kernel (what a GPU picks for these shapes)."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[0]

    F.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Saved:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # bytes of the storage behind it (a view saves its whole base)
    storage: int  # identity of that storage during the forward (for de-duplication only)
    is_parameter: bool


def saved_tensors(model: dict[str, Any], batch: int, *, precision: str = "fp32", device: str = "cuda",
                  fake: bool = True, seed: int = 0) -> list[Saved]:
    """Every tensor autograd saves in one training forward of the U-Net `model` at `batch`, in order.

    fake=True: fake tensors on `device` (no memory; "cuda" needs no GPU). fake=False: real tensors on `device`
    (for the test that the fake forward saves exactly what a real one does).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sferd.nn.build import build_unet

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device != "cuda":
        raise ValueError("the bf16 estimate follows the CUDA autocast policy: use device='cuda'")
    saved: list[Saved] = []
    keep: list[Any] = []  # hold every saved tensor, so no storage identity is reused during the forward
    with torch.device("meta"):
        net = build_unet(model)  # real init cannot run on fake tensors (truncated normal reads values)
    if not fake:
        torch.manual_seed(seed)
        net = build_unet(model).to(device)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        with torch.device(device):
            params = ({k: torch.empty(p.shape, requires_grad=True) for k, p in net.named_parameters()} if fake
                      else dict(net.named_parameters()))
            r, c = model["resolution"], model["in_channels"]
            x, u = torch.randn(batch, c, r, r), torch.rand(batch)
            y = torch.zeros(batch, dtype=torch.long) if model.get("num_classes") else None
        param_storages = {p.untyped_storage()._cdata for p in params.values()}

        def pack(t):
            keep.append(t)
            st = t.untyped_storage()
            saved.append(Saved(tuple(t.shape), str(t.dtype).removeprefix("torch."), st.nbytes(), st._cdata,
                               st._cdata in param_storages))
            return t

        amp = _cuda_autocast_bf16() if precision == "bf16" else contextlib.nullcontext()
        attention = _fused_attention() if (fake and device == "cuda") else contextlib.nullcontext()
        net.train()  # dropout masks are saved in training
        with amp, attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = torch.func.functional_call(net, params, (x, u, y))
        del out
    return saved


def activation_bytes(saved: list[Saved]) -> int:
    """Bytes of the distinct non-parameter storages saved for backward."""
    seen: dict[int, int] = {}
    for s in saved:
        if not s.is_parameter:
            seen[s.storage] = s.nbytes
    return sum(seen.values())


@dataclass(frozen=True)
class Activations:
    per_sample: int  # bytes per image
    fixed: int  # bytes independent of the batch (autocast's weight copies, the embedding tables' lookups, …)


def activations(model: dict[str, Any], precision: str) -> Activations:
    return _activations(_model_key(model), precision)


@lru_cache(maxsize=None)
def _activations(key: str, precision: str) -> Activations:
    model = json.loads(key)
    # two batch sizes: slope = per image, intercept = batch-independent (a third would only repeat the line:
    # every saved tensor is either batch-major or batch-free)
    b1, b2 = 2, 4
    s1, s2 = (activation_bytes(saved_tensors(model, b, precision=precision)) for b in (b1, b2))
    per = (s2 - s1) // (b2 - b1)
    return Activations(per_sample=per, fixed=max(0, s1 - per * b1))


@dataclass(frozen=True)
class TrainingMemory:
    precision: str
    batch: int
    trained_params: int
    frozen_params: int
    states: int  # bytes
    activations: Activations

    def bytes_at(self, micro_batch: int) -> int:
        return self.states + self.activations.fixed + micro_batch * self.activations.per_sample

    @property
    def total(self) -> int:
        """The whole per-GPU batch in one micro-batch."""
        return self.bytes_at(self.batch)

    def largest_micro_batch(self, gpu_memory_gib: float) -> int:
        """The largest micro-batch (≤ the batch) whose estimate fits HEADROOM of the memory; 0 if none does."""
        room = HEADROOM * gpu_memory_gib * GIB - self.states - self.activations.fixed
        if room <= 0:
            return 0
        return int(min(self.batch, room // max(1, self.activations.per_sample)))


def training_memory(model: dict[str, Any], batch: int, precision: str, *,
                    frozen: dict[str, Any] | None = None) -> TrainingMemory:
    """Per-GPU memory of training U-Net `model` at `batch` images per GPU (with a frozen U-Net `frozen` held too)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trained = parameter_count(model)
    held = parameter_count(frozen) if frozen is not None else 0
    return TrainingMemory(precision=precision, batch=batch, trained_params=trained, frozen_params=held,
                          states=STATE_BYTES_PER_PARAM * trained + FROZEN_BYTES_PER_PARAM * held,
                          activations=activations(model, precision))


def stage_memory(params: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any] | None] | None:
    """(trained U-Net, batch, frozen U-Net or None) of a U-Net training stage's resolved params, None for other
    kinds (their networks are not U-Nets: the estimate would not be about them)."""
    kind = params.get("kind")
    if kind in ("teacher", "cld_teacher"):  # a CLD teacher is the same U-Net on 2C channels
        return params["model"], int(params["training"]["batch_size"]), None
    if kind in ("distill", "distill_cfd"):  # a CFD halving also holds a classifier: not counted (see plan)
        return params["model"], int(params["training"]["batch_size"]), params["teacher"]["model"]
    return None


def plan_line(params: dict[str, Any], gpu_memory_gib: float) -> str | None:
    """`plan`'s memory line for a stage: both precisions, the spec's own (when its params name one) marked."""
    found = stage_memory(params)
    if found is None:
        return None
    model, batch, frozen = found
    own = params.get("precision") or params.get("training", {}).get("precision")
    parts = []
    for precision in PRECISIONS:
        m = training_memory(model, batch, precision, frozen=frozen)
        micro = m.largest_micro_batch(gpu_memory_gib)
        fit = ("fits whole" if micro >= batch else f"micro-batch ≤ {micro} per GPU" if micro
               else "does not fit even at micro-batch 1")
        parts.append(f"{precision}{' (spec)' if precision == own else ''} {m.total / GIB:,.1f} GiB, {fit}")
    return f"mem: batch {batch} on one GPU: " + "; ".join(parts) + f" in {gpu_memory_gib:g} GiB"
