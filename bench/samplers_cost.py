"""Cost of each sampler of the family (sferd.diffusion.samplers) per sample, and its ratio to DDIM, on one tiny U-Net.

Usage (repository root, project venv active):
    python bench/samplers_cost.py                  # 32×32×3 U-Net, batch 8, 8 steps, 5 repeats
    python bench/samplers_cost.py --steps 16 --repeats 9
    python bench/samplers_cost.py --tiny           # the CI configuration (tests/test_bench_samplers_tiny.py)

Every sampler makes one network evaluation per step, so the ratio to DDIM measures the sampler's own overhead:
gDDIM's ε̂ differences (and its coefficient precomputation, cached per grid after the warm-up call and so not in the
median), D-DDIM's correction term, Euler's float64 coefficients. `gddim_cld` runs the same U-Net on the augmented
(x, v) state (2C channels in and out), the way a CLD teacher would. Timings are medians over interleaved repeats
(every sampler timed once per round, so a neighbour's load affects all of them alike) after one warm-up each. The
numbers are CPU seconds on this machine only; the ratios are what carries over.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sferd.diffusion.cld import CLD  # noqa: E402
from sferd.diffusion.denoiser import NetworkDenoiser  # noqa: E402
from sferd.diffusion.dode import DDIMBase, GDDIMBase, calibrate  # noqa: E402
from sferd.diffusion.samplers import make_sampler  # noqa: E402
from sferd.nn.unet import UNet, UNetConfig  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402


def _net(channels: int, res: int, base: int, seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(channels, channels, res, base, (1, 2), 1, (res // 2,), norm_groups=min(32, base))).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sampler return the same constant
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


class CLDEps:
    """A U-Net as an ε-model of the CLD state: (B, 2, C, H, W) → (B, 2C, H, W) → back; t enters as the time input."""

    def __init__(self, net: UNet):
        self.net = net

    @torch.no_grad()
    def __call__(self, u, t, y=None):
        b, _, c, h, w = u.shape
        return self.net(u.reshape(b, 2 * c, h, w), t, y).reshape(b, 2, c, h, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="batch 2, 16×16×1, base 16, 4 steps, 1 repeat")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.tiny:
        res, ch, base, batch, steps, repeats = 16, 1, 16, 2, 4, 1
    else:
        res, ch, base, batch, steps, repeats = 32, 3, 32, args.batch, args.steps, args.repeats

    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}")
    print(f"U-Net {res}×{res}×{ch}, base {base} channels, mult (1, 2), 1 res-block; batch {batch}, {steps} steps, "
          f"median of {repeats} interleaved repeat(s)" + (" — TINY configuration" if args.tiny else ""))
    den = NetworkDenoiser(_net(ch, res, base, 0), "eps")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, ch, res, res, generator=g)
    cal = calibrate(DDIMBase(), den, torch.randn(batch, ch, res, res, generator=g), steps, factor=2)
    q = min(2, steps - 1)
    cal_g = calibrate(GDDIMBase(order=q), den, torch.randn(batch, ch, res, res, generator=g), steps, factor=2)
    cld = CLD(t_min=1e-3)
    cld_eps = CLDEps(_net(2 * ch, res, base, 1))
    cld_noise = torch.randn(batch, 2, ch, res, res, generator=g)

    runs = {
        "ddim": lambda: make_sampler("ddim")(den, noise, steps),
        f"gddim (order {q})": lambda: make_sampler("gddim", order=q)(den, noise, steps),
        "euler_pf": lambda: make_sampler("euler_pf")(den, noise, steps),
        "d_ddim (K = 2)": lambda: make_sampler("d_ddim", lambdas=cal.lambdas)(den, noise, steps),
        f"d_gddim (order {q}, K = 2)": lambda: make_sampler("d_gddim", lambdas=cal_g.lambdas, order=q)(
            den, noise, steps),
        f"gddim_cld (order {q})": lambda: make_sampler("gddim_cld", process=cld, order=q)(
            cld_eps, cld_noise, steps),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up: allocator, first dispatch, the gDDIM coefficient caches
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["ddim"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:25s} {med / batch:.5f} s/sample  {med / ref:5.2f}× DDIM  ({steps} NFE)")


if __name__ == "__main__":
    main()
