"""What process-count invariance costs: per-sample draws vs one batch generator, against a training update.

Usage (repository root, project venv active):
    python bench/draws_overhead.py               # quickstart teacher update (8×8, batch 64) and a 32×32 one
    python bench/draws_overhead.py --repeats 30

The training engine draws every sample's image index, flip, time step, noise and dropout key from the sample's own
generator (sferd/methods/draws.py), so results do not depend on the process count. The reference is what it
replaces: the same draws from one generator per batch. Printed: both costs per update, their difference as a
fraction of one full teacher update (forward, backward, Adam) of the same batch — measured side by side in this
run — and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sferd.diffusion.denoiser import NetworkDenoiser  # noqa: E402
from sferd.methods.draws import GeneratorDraws, SampleDraws  # noqa: E402
from sferd.methods.teacher import teacher_loss  # noqa: E402
from sferd.nn.unet import UNet, UNetConfig  # noqa: E402
from sferd.util.machine import cpu_model  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def draws_cost(kind: str, batch: int, shape: tuple[int, ...], step: int = 7) -> None:
    if kind == "sample":
        idx = range(step * batch, (step + 1) * batch)
        data = SampleDraws(1, 2, idx)
        d = SampleDraws(1, 3, idx)
    else:
        data = d = GeneratorDraws(torch.Generator().manual_seed(step), batch)
    data.randint(0, 50_000), data.rand()           # data choice: index, flip
    d.randint(0, 2**31), d.rand(), d.randn(*shape)  # dropout key, time step, noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    configs = [
        ("quickstart teacher 8×8", UNetConfig(in_channels=1, out_channels=1, resolution=8, base_channels=16,
                                             channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                             num_heads=1, norm_groups=8), 64),
        ("U-Net 32×32 (base 64, mult 1,2,2)", UNetConfig(in_channels=3, out_channels=3, resolution=32,
                                                          base_channels=64, channel_mult=(1, 2, 2),
                                                          num_res_blocks=2, attention_resolutions=(16,),
                                                          num_heads=1, norm_groups=32), 16),
    ]
    print("| model, batch | update | per-sample draws | batch draws (reference) | extra / update |")
    print("|---|---:|---:|---:|---:|")
    for label, cfg, batch in configs:
        torch.manual_seed(0)
        net = UNet(cfg).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        den = NetworkDenoiser(net, "x")
        shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
        x0 = torch.rand(batch, *shape) * 2 - 1

        def update() -> None:
            loss = teacher_loss(den, x0, GeneratorDraws(torch.Generator().manual_seed(0), batch),
                                weighting="truncated_snr").mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        reps = max(3, args.repeats // (4 if cfg.resolution > 8 else 1))
        u, s, g = [], [], []
        for _ in range(3):  # interleaved, so a change in machine load hits all three alike
            u.append(median_ms(update, reps))
            s.append(median_ms(lambda: draws_cost("sample", batch, shape), args.repeats))
            g.append(median_ms(lambda: draws_cost("batch", batch, shape), args.repeats))
        u_ms, s_ms, g_ms = (statistics.median(v) for v in (u, s, g))
        print(f"| {label}, {batch} | {u_ms:.1f} ms | {s_ms:.2f} ms | {g_ms:.2f} ms | "
              f"{100 * (s_ms - g_ms) / u_ms:.1f} % |")


if __name__ == "__main__":
    main()
