"""What CLD costs next to the VP process, measured side by side on one U-Net shape (issue 12, part 3).

Usage (repository root, project venv active, one thread):
    OMP_NUM_THREADS=1 python bench/cld_cost.py                 # the quickstart teacher's U-Net on digits 8×8
    OMP_NUM_THREADS=1 python bench/cld_cost.py --cifar         # a 32×32×3 U-Net (base 32, mult 1,2)
    OMP_NUM_THREADS=1 python bench/cld_cost.py --tiny          # the CI configuration (tests/test_bench_tiny.py)

1. Training update: one Adam update of the VP teacher (x-prediction, truncated-SNR weighting: sferd.methods.teacher)
   vs one of the CLD teacher (ε in gDDIM's R_t parameterisation: sferd.methods.cld_teacher), same U-Net fields, the
   CLD one on 2C channels in and out, same batch, per-sample draws as in the stages. The ratio is the CLD teacher's
   update cost in VP updates: the wider first and last convolutions plus the per-sample 2×2 matrices (Ψ(t,0), R_t).
2. Sampling: seconds per sample per NFE of VP DDIM (the VP network), of gDDIM order 2 on CLD and of plain Euler on
   CLD (the CLD network), at the same NFE; the ratio to DDIM.
Timings are medians over interleaved repeats (each variant timed once per round, so a neighbour's load affects all
alike) after one warm-up each. Seconds are this machine's; the ratios are what carries over.

Measured (2026-12-01, Intel Xeon, 1 thread, cores shared with other jobs):
* quickstart U-Net (8×8, base 16, 208k parameters), batch 64, 16 NFE: update VP 110 ms, CLD 122 ms (1.11×);
  sampling VP DDIM 0.48, CLD gDDIM q=2 0.59, CLD Euler 0.59 ms/sample/NFE (1.22×: the per-step 2×2 state algebra
  is not negligible next to so small a network).
* 32×32×3 U-Net (base 32, 827k parameters), batch 32, 8 NFE: update 1.35 s vs 1.32 s (0.98×); sampling 14.5 vs
  14.8 (gDDIM, 1.02×) and 14.4 (Euler, 0.99×) ms/sample/NFE: at image size the CLD overhead vanishes.

Quickstart-scale CLD teacher (the real `cld_teacher` stage on digits 8×8 with the quickstart teacher's U-Net and
training settings: 800 updates, batch 64, lr 1e-3, warm-up 100, EMA 0.99; FID of 1000 samples, digits-CNN v1):
* time: 12.7-14.3 s per 100 updates on one thread (the run's own log, second half); 800 updates took 129 s alone.
* loss (mean ε-MSE over the last 100 updates): 0.043 with the mixed score, 0.066 without.
* without the mixed score the backward flow diverges (state rms ~1800 at t_min; FID 16-23 at every NFE and
  order, samples saturated noise); at t_min = 1e-2 the same (FID 16-20).
* with the mixed score (the default), FID by NFE 4 / 8 / 16 / 32 (one teacher, one sample set per cell):
    gDDIM q=0   27.7 /  9.0 /  5.28 / 4.23
    gDDIM q=1   30.3 /  7.2 /  4.43 / 3.79
    gDDIM q=2   29.8 / 11.9 /  4.79 / 3.66
    gDDIM q=3   29.9 / 20.1 / 15.3  / 10.0
    Euler       20.3 / 20.1 / 20.9  / 17.7
  The VP quickstart teacher trained the same way: FID 4.8 with 8 DDIM steps. Held-out floor 0.11. Order 3 loses on
  this short-trained network although it wins on exact Gaussian ε's (tests/test_cld.py): extrapolating through
  four predictions amplifies the network's error on the quadratic grid's long first steps.
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

from sferd.diffusion.denoiser import NetworkDenoiser  # noqa: E402
from sferd.diffusion.samplers import make_sampler  # noqa: E402
from sferd.methods.cld_teacher import EpsModel, cld_process, cld_teacher_loss, to_state  # noqa: E402
from sferd.methods.draws import SampleDraws  # noqa: E402
from sferd.methods.teacher import teacher_loss  # noqa: E402
from sferd.nn.build import build_unet  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402

PROCESS = {"m_inv": 4.0, "beta": 4.0, "gamma": 0.04, "t_min": 1e-3}  # gDDIM's CIFAR-10 CLD


def unet(channels: int, res: int, base: int, mult: list[int], attn: list[int], groups: int, seed: int):
    torch.manual_seed(seed)
    return build_unet({"in_channels": channels, "out_channels": channels, "resolution": res, "base_channels": base,
                       "channel_mult": mult, "num_res_blocks": 1, "attention_resolutions": attn, "num_heads": 1,
                       "head_channels": None, "dropout": 0.0, "num_classes": None, "norm_groups": groups})


def perturb_weights(net):
    with torch.no_grad():  # zero-initialised output layers would make every sampler return the same constant
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()  # warm-up (and gDDIM's coefficient precomputation, cached per grid)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="batch 4, 4 steps, 1 repeat (CI)")
    ap.add_argument("--cifar", action="store_true", help="32×32×3, base 32, mult (1, 2), attention at 16")
    ap.add_argument("--batch", type=int, default=64, help="training batch (the quickstart teacher's: 64)")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.cifar:
        ch, res, base, mult, attn, groups = 3, 32, 32, [1, 2], [16], 8
    else:  # specs/quickstart.yaml's teacher
        ch, res, base, mult, attn, groups = 1, 8, 16, [1, 2], [4], 8
    batch, sample_batch, steps, repeats = args.batch, args.sample_batch, args.steps, args.repeats
    if args.tiny:
        batch, sample_batch, steps, repeats = 4, 4, 4, 1

    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}")
    print(f"U-Net {res}×{res}, base {base}, mult {tuple(mult)}, 1 res-block, attention at {attn}: VP on {ch} channel(s), "
          f"CLD on {2 * ch}; training batch {batch}, sampling batch {sample_batch}, {steps} NFE; median of {repeats} "
          "interleaved repeat(s)" + (" — TINY configuration" if args.tiny else ""))
    process = cld_process(PROCESS)
    vp_net, cld_net = unet(ch, res, base, mult, attn, groups, 0), unet(2 * ch, res, base, mult, attn, groups, 0)
    print(f"parameters: VP {sum(p.numel() for p in vp_net.parameters()):,}, "
          f"CLD {sum(p.numel() for p in cld_net.parameters()):,}")
    x0 = torch.rand(batch, ch, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vp_opt, cld_opt = torch.optim.Adam(vp_net.parameters(), 1e-4), torch.optim.Adam(cld_net.parameters(), 1e-4)
    vp_den = NetworkDenoiser(vp_net, "x")
    step = {"vp": 0, "cld": 0}

    def vp_update():
        draws = SampleDraws(0, 1, range(step["vp"] * batch, (step["vp"] + 1) * batch))
        step["vp"] += 1
        vp_opt.zero_grad(set_to_none=True)
        teacher_loss(vp_den, x0, draws, weighting="truncated_snr").mean().backward()
        vp_opt.step()

    def cld_update():
        draws = SampleDraws(0, 1, range(step["cld"] * batch, (step["cld"] + 1) * batch))
        step["cld"] += 1
        cld_opt.zero_grad(set_to_none=True)
        cld_teacher_loss(cld_net, process, x0, draws, mixed=True).mean().backward()
        cld_opt.step()

    vp_net.train(), cld_net.train()
    t = median_times({"vp": vp_update, "cld": cld_update}, repeats)
    print(f"training update      VP {t['vp'] * 1e3:9.2f} ms   CLD {t['cld'] * 1e3:9.2f} ms   "
          f"CLD/VP {t['cld'] / t['vp']:.2f}×")

    perturb_weights(vp_net), perturb_weights(cld_net)
    g = torch.Generator().manual_seed(1)
    noise_vp, noise_cld = torch.randn(sample_batch, ch, res, res, generator=g), torch.randn(sample_batch, 2 * ch, res, res, generator=g)
    ddim, gddim = make_sampler("ddim"), make_sampler("gddim_cld", process=process, order=min(2, steps - 1))
    euler, eps = make_sampler("euler_cld", process=process), EpsModel(cld_net, process=process, mixed=True)
    with torch.no_grad():
        s = median_times({"ddim": lambda: ddim(NetworkDenoiser(vp_net, "eps"), noise_vp, steps),
                          "gddim_cld": lambda: gddim(eps, to_state(noise_cld), steps),
                          "euler_cld": lambda: euler(eps, to_state(noise_cld), steps)}, repeats)
    per = {k: v / sample_batch / steps for k, v in s.items()}
    for k, label in (("ddim", "VP DDIM"), ("gddim_cld", f"CLD gDDIM (order {min(2, steps - 1)})"),
                     ("euler_cld", "CLD Euler")):
        print(f"sampling {label:<22} {per[k] * 1e3:9.4f} ms/sample/NFE   {per[k] / per['ddim']:.2f}× VP DDIM")


if __name__ == "__main__":
    main()
