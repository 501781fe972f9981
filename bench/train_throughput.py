"""Training throughput of the paper U-Nets: images/s, achieved TFLOP/s per GPU, peak memory, largest micro-batch.

Usage (repository root, project venv active):
    python bench/train_throughput.py                               # table1 and table2 U-Nets, fp32
    python bench/train_throughput.py --precision bf16 --tf32 --compile --gpu-memory-gib 80 --gpus 8
    python bench/train_throughput.py --tiny                        # the CPU/CI configuration, also on a GPU

What is timed: one training step of the spec's teacher U-Net (read from the spec through the spec loader and the
stage graph, as the teacher stage builds it): forward at random time/class inputs, MSE loss, backward, Adam step
(fused on CUDA, foreach on the CPU), gradients set to None. Median over `--steps` timed steps after `--warmup`.

* Per-GPU batch: the spec's global batch over `--gpus` (the batch one GPU of a data-parallel run holds). It is timed
  at the largest micro-batch that fits `--gpu-memory-gib` when it does not fit whole (what gradient accumulation
  would run).
* TFLOP/s: FLOPs of one training step (forward + backward) counted by torch's FlopCounterMode on meta tensors
  (no memory, no compute: the same counter `sferd-spec plan` prices with), times images/s. Counted FLOPs are
  dense matmul/conv FLOPs; element-wise work (norms, activations) is not counted, as in the usual MFU figures.
* Peak memory: measured on CUDA (torch.cuda.max_memory_allocated) at the timed micro-batch and at half of it,
  a straight line through the two giving the largest micro-batch that fits `--gpu-memory-gib` (90 %, as plan).
  Beside it, plan's GPU-less estimate (sferd/nn/memory.py) for the per-GPU batch, so the two can be compared.
  On a CPU there is no allocator peak to read: only the estimate is printed.

Without CUDA (or with `--tiny`) it runs a tiny configuration — base 16 channels, 1 residual block per level,
batch 2, 2 steps — so CI keeps the script working; the printed numbers then say nothing about GPU throughput.
The machine (torch, device, CPU model, threads) is printed first: numbers without it mean nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sferd.nn.build import build_unet  # noqa: E402
from sferd.nn.memory import GIB, HEADROOM, parameter_count, training_memory  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402

DEFAULT_SPECS = ("specs/table1.yaml", "specs/table2.yaml")
TINY = {"base_channels": 16, "num_res_blocks": 1, "batch": 2, "steps": 2, "warmup": 1}


def teacher_block(spec_path: str) -> tuple[dict, int]:
    """(resolved U-Net config, global batch) of the spec's teacher stage: the dict the stage itself builds from."""
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    spec = load_spec(ROOT / spec_path, display_path=spec_path)
    [teacher] = [st for st in build_graph(spec, spec_path=spec_path) if st.kind == "teacher"]
    return teacher.params["model"], int(teacher.params["training"]["batch_size"])


def tiny_block(model: dict) -> tuple[dict, list[str]]:
    """The spec's U-Net shrunk to CPU size, and what was changed (printed: a tiny figure is not the paper's)."""
    tiny = {**model, "base_channels": TINY["base_channels"], "num_res_blocks": TINY["num_res_blocks"],
            "norm_groups": min(model["norm_groups"], TINY["base_channels"])}
    if model.get("head_channels"):  # heads of base-many channels divide every level's width
        tiny["head_channels"] = TINY["base_channels"]
    changed = [f"{k} {tiny[k]} (spec {model[k]})" for k in ("base_channels", "num_res_blocks", "head_channels",
                                                             "norm_groups") if tiny.get(k) != model.get(k)]
    return tiny, changed


def training_flops_per_image(model: dict) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one image, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_unet(model)
        x, u = torch.zeros(1, model["in_channels"], model["resolution"], model["resolution"]), torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long) if model.get("num_classes") else None
        fwd = FlopCounterMode(display=False)
        with fwd:
            out = net(x, u, y)
        both = FlopCounterMode(display=False)
        with both:
            net(x, u, y).square().mean().backward()
    del out
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def make_step(model: dict, batch: int, device: torch.device, precision: str, compile_: bool, seed: int = 0):
    """A closure running one training step on fixed random inputs; returns the network (to free it later)."""
    torch.manual_seed(seed)
    net = build_unet(model).to(device).train()
    r, c = model["resolution"], model["in_channels"]
    x = torch.randn(batch, c, r, r, device=device)
    target = torch.randn(batch, model["out_channels"], r, r, device=device)
    u = torch.rand(batch, device=device)
    y = torch.randint(model["num_classes"], (batch,), device=device) if model.get("num_classes") else None
    cuda = device.type == "cuda"
    # fused Adam on CUDA (one kernel for all parameters); foreach on the CPU, where no fused kernel is faster
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True if cuda else None, foreach=None if cuda else True)
    fwd = torch.compile(net) if compile_ else net

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = fwd(x, u, y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, net


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):  # allocator, cuDNN autotuning, compilation
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measured_peak(model: dict, batch: int, device: torch.device, precision: str, compile_: bool) -> int:
    """CUDA allocator peak (bytes) over two training steps at `batch`, from a clean allocator."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step, net = make_step(model, batch, device, precision, compile_)
    step()
    step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step, net
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def bench_one(spec_path: str, args, device: torch.device) -> None:
    model, global_batch = teacher_block(spec_path)
    tiny = args.tiny or device.type != "cuda"
    per_gpu = math.ceil(global_batch / args.gpus)
    print(f"\n== {spec_path}: teacher U-Net, {parameter_count(model) / 1e6:.1f} M parameters, "
          f"{model['resolution']}×{model['resolution']}, global batch {global_batch}, "
          f"per-GPU batch {per_gpu} on {args.gpus} GPU{'s' if args.gpus != 1 else ''}")
    if tiny:
        # the full-size estimate is `sferd-spec plan`'s (a few fake-tensor forwards of the big network: ~15 s on
        # this CPU); the tiny run estimates its own network, which exercises the same code
        print(f"   full-size per-GPU memory and micro-batch: `sferd-spec plan {spec_path} --gpu-memory-gib "
              f"{args.gpu_memory_gib:g}`")
        model, changed = tiny_block(model)
        batch, steps, warmup = TINY["batch"], args.steps or TINY["steps"], args.warmup or TINY["warmup"]
        print(f"   TINY configuration (no CUDA or --tiny): {', '.join(changed)}, batch {batch}, {steps} timed steps: "
              "checks that the bench runs; not a GPU figure")
        per_gpu = batch
    est = training_memory(model, per_gpu, args.precision)
    est_micro = est.largest_micro_batch(args.gpu_memory_gib)
    print(f"   estimate (sferd-spec plan's, no GPU): {'this tiny network at ' if tiny else 'per-GPU '}batch {per_gpu} "
          f"needs {est.total / GIB:.3f} GiB {args.precision}; largest micro-batch in {args.gpu_memory_gib:g} GiB: "
          f"{est_micro}")
    if not tiny:
        batch, steps, warmup = min(per_gpu, max(1, est_micro)), args.steps or 20, args.warmup or 5
        if batch < per_gpu:
            print(f"   per-GPU batch {per_gpu} does not fit: timing micro-batch {batch} (gradient accumulation "
                  f"{math.ceil(per_gpu / batch)}×)")
    fwd_flops, train_flops = training_flops_per_image(model)
    while True:
        try:
            step, net = make_step(model, batch, device, args.precision, args.compile)
            times = time_steps(step, device, warmup, steps)
            break
        except torch.OutOfMemoryError:
            # the estimate was optimistic for this GPU (context, workspaces): say so and time a smaller micro-batch
            step = net = None
            if device.type != "cuda" or batch == 1:
                raise
            torch.cuda.empty_cache()
            print(f"   out of memory at micro-batch {batch} (estimate said it fits): retrying at {batch // 2}")
            batch //= 2
    del step, net
    med = statistics.median(times)
    ips = batch / med
    tflops = train_flops * ips / 1e12
    print(f"   step: median {med * 1e3:.1f} ms over {steps} steps (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) "
          f"at batch {batch}, {args.precision}{', TF32' if args.tf32 else ''}{', compiled' if args.compile else ''}")
    print(f"   throughput: {ips:.2f} images/s per {'GPU' if device.type == 'cuda' else 'process'}, "
          f"{tflops:.3f} TFLOP/s achieved ({train_flops / 1e9:.2f} GFLOP per image per training step, "
          f"= {train_flops / fwd_flops:.2f}× the forward; plan prices 3×)")
    if device.type == "cuda":
        half = max(1, batch // 2)
        p_full = measured_peak(model, batch, device, args.precision, args.compile)
        p_half = measured_peak(model, half, device, args.precision, args.compile) if half < batch else p_full
        per_image = (p_full - p_half) / (batch - half) if half < batch else float("nan")
        fixed = p_full - per_image * batch if half < batch else float("nan")
        fits = (int((HEADROOM * args.gpu_memory_gib * GIB - fixed) // per_image) if half < batch and per_image > 0
                else None)
        print(f"   peak memory (measured): {p_full / GIB:.2f} GiB at batch {batch}, {p_half / GIB:.2f} GiB at {half}; "
              f"per-GPU batch {per_gpu} → {(fixed + per_image * per_gpu) / GIB:.2f} GiB by a straight line "
              f"(estimate {est.total / GIB:.2f} GiB); largest micro-batch in {args.gpu_memory_gib:g} GiB: "
              f"{fits if fits is not None else 'n/a'} (estimate {est_micro})" if not tiny else
              f"   peak memory (measured): {p_full / GIB:.3f} GiB at batch {batch} (tiny model)")
    else:
        print("   peak memory: not measurable on the CPU (no allocator peak); see the estimate above")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", action="append", help="spec(s) whose teacher U-Net to time (default: table1, table2)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the global batch is split over (per-GPU batch)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 20; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 5; tiny: 1)")
    ap.add_argument("--tiny", action="store_true", help="the tiny configuration even with CUDA")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    rec = machine_record(world_size=1, precision=args.precision)
    print(f"machine: {describe(rec)}; device {device}")
    print(f"cpu: {rec['cpu_model']}, {rec['cpu_threads']} torch threads; torch {rec['torch']}")
    for spec_path in args.spec or DEFAULT_SPECS:
        bench_one(spec_path, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
