"""Cost of a D-ODE calibration stage (sferd/pipeline/stages/dode_calibration.py) against one DDIM sampling pass of
the same batch at the same step count, measured in the same run, on a randomly initialised U-Net.

Usage (repository root, project venv active):
    python bench/dode_calibration.py                        # the quickstart's teacher (digits 8×8), K = 10,
                                                            # batch 256, 1/2/4/8 steps, 3 repeats
    python bench/dode_calibration.py --batch 512 --factor 4 --steps 1 2 4 8 16
    python bench/dode_calibration.py --base gddim --order 1 # D-gDDIM (order 1) calibrated on a gDDIM teacher
    python bench/dode_calibration.py --tiny                 # the CI configuration (tests/test_bench_samplers_tiny.py)

What is timed is the stage's own work for one step count N (`dode_calibration.calibrate`: the teacher solver over
K·N steps, the greedy fit over N, and the two N-step runs that measure the trajectory error before and after),
i.e. B·(K·N + 3N) network evaluations, in the stage's chunks (the FID chunk of 64). The reference is one DDIM pass
of the same B images over N steps (B·N evaluations, in the same chunks): the ratio is what carries over to other
machines, ≈ K + 3 when the network dominates. Loading the checkpoint and Python start-up (~5 s of imports per DVC
stage on a CPU) are not in the figure. A random network costs what a trained one does; its λ's mean nothing.
Timings are medians over interleaved repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sferd.diffusion.denoiser import NetworkDenoiser  # noqa: E402
from sferd.diffusion.samplers import make_sampler  # noqa: E402
from sferd.nn.build import build_unet  # noqa: E402
from sferd.pipeline.stages.common import load_model  # noqa: E402
from sferd.pipeline.stages.dode_calibration import calibrate, calibration_noise  # noqa: E402
from sferd.util.distributed import Launch  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402


def quickstart_teacher() -> dict:
    """The network specs/quickstart.yaml's teacher stage builds (as the compiler resolves it)."""
    from sferd.pipeline.graph import _model_config
    from sferd.spec import load_spec

    return _model_config(load_spec(ROOT / "specs/quickstart.yaml", display_path="specs/quickstart.yaml"))


TINY_MODEL = {"in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
              "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None,
              "dropout": 0.0, "num_classes": None, "norm_groups": 4}


def _checkpoint(folder: Path, model: dict) -> str:
    """A random-init checkpoint in the suite's format (what the teacher stage writes: state_dict + config)."""
    torch.manual_seed(0)
    net = build_unet(model)
    with torch.no_grad():  # zero-initialised output layers would make every prediction the same constant
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = folder / "model.pt"
    torch.save({"state_dict": net.state_dict(), "config": {"model": model}}, path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 8×8 base-8 U-Net, batch 4, K = 2, steps 1 2, 1 repeat")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=256, help="calibration batch B")
    ap.add_argument("--factor", type=int, default=10, help="K (D-ODE: 10)")
    ap.add_argument("--chunk", type=int, default=64, help="network batch (the stage uses evaluation.sample_batch_size)")
    ap.add_argument("--base", choices=["ddim", "gddim"], default="ddim")
    ap.add_argument("--order", type=int, default=1, help="gDDIM order (with --base gddim)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.tiny:
        model, steps, batch, factor, chunk, repeats = TINY_MODEL, [1, 2], 4, 2, 2, 1
        label = "8×8 U-Net, base 8 — TINY configuration"
    else:
        model, steps, batch, factor, chunk, repeats = (quickstart_teacher(), args.steps, args.batch, args.factor,
                                                       args.chunk, args.repeats)
        label = "the quickstart's teacher U-Net (digits 8×8, random init)"
    solver = {"base": args.base, **({"order": args.order} if args.base == "gddim" else {})}
    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}")
    print(f"{label}; D-ODE base {solver}, teacher the same solver, K = {factor}, calibration batch {batch} in chunks "
          f"of {chunk}; median of {repeats} interleaved repeat(s)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), model)
        net = load_model(ckpt, model)
        denoise = NetworkDenoiser(net, "x")
        noise = calibration_noise(list(range(batch)), (model["in_channels"], model["resolution"], model["resolution"]))
        ddim = make_sampler("ddim")

        def reference(n: int) -> None:
            for lo in range(0, batch, chunk):
                ddim(denoise, noise[lo:lo + chunk], n)

        def stage(n: int) -> None:
            calibrate({"student_steps": n, "sampler": solver, "teacher_solver": solver, "teacher_steps": factor * n,
                       "factor": factor, "clip": True, "batch_size": batch, "seed": 0, "chunk_size": chunk,
                       "teacher": {"checkpoint": ckpt, "model": model, "parameterization": "x"}}, Launch(), net)

        runs = {(what, n): (lambda fn=fn, n=n: fn(n)) for n in steps for what, fn in (("ddim", reference),
                                                                                    ("calibration", stage))}
        for fn in runs.values():
            fn()  # warm-up: allocator, first dispatch, gDDIM coefficient caches
        times: dict = {k: [] for k in runs}
        for _ in range(repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    print(f"{'steps':>5s} {'calibration s':>14s} {'DDIM pass s':>12s} {'ratio':>9s} {'network evals':>14s}")
    for n in steps:
        cal, ref = statistics.median(times[("calibration", n)]), statistics.median(times[("ddim", n)])
        print(f"{n:5d} {cal:14.3f} {ref:12.4f} {cal / ref:8.1f}× {batch * (factor * n + 3 * n):14d}")


if __name__ == "__main__":
    main()
