"""One training step of the project's U-Net against `diffusers.UNet2DModel` of about the same size, same machine,
same run (issue 9, item 10; target: ours ≤ 1.0× theirs).

Usage (repository root, project venv with the bench extra: `pip install -e '.[bench]'`):
    python bench/unet_vs_diffusers.py                      # CPU size: table1's U-Net family at base 64, batch 4
    python bench/unet_vs_diffusers.py --config table1      # the paper CIFAR-10 U-Net itself (a GPU machine)
    python bench/unet_vs_diffusers.py --threads 1 --repeats 9 --profile

The step: forward at random inputs and times, MSE loss, backward, Adam step (fused on CUDA, foreach on the CPU),
gradients set to None — the same code for both networks. The repetitions are interleaved (ours, theirs, theirs,
ours, … alternating who goes first) so load from other processes falls on both alike; each network's median and the
median of the per-repetition ratios are printed, with the machine.

diffusers is configured as the same kind of network, not tuned either way: the same levels, residual blocks per
level, attention at the same feature-map sizes with the same head width, BigGAN-style residual down/up-sampling,
scale/shift time conditioning, GroupNorm ε 1e-6, no dropout; its base width is the multiple of the norm-group count
whose parameter count is closest to ours (both counts are printed). `--profile` (or a ratio above 1.0) prints where
each network's step spends its time (torch.profiler, self time per op).
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

from sferd.nn.build import build_unet  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402


def ours_config(name: str) -> dict:
    """`table1`: the paper CIFAR-10 teacher U-Net as the spec resolves it; `small`: the same family at base 64 and
    2 residual blocks per level (a CPU finishes a step in seconds). Both without dropout (a student's network)."""
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "specs/table1.yaml", display_path="specs/table1.yaml")
    [teacher] = [st for st in build_graph(spec, spec_path="specs/table1.yaml") if st.kind == "teacher"]
    model = {**teacher.params["model"], "dropout": 0.0}
    if name == "small":
        model.update(base_channels=64, num_res_blocks=2)
    return model


def diffusers_model(model: dict, width: int):
    from diffusers import UNet2DModel

    res = [model["resolution"] >> i for i in range(len(model["channel_mult"]))]
    attn = set(model["attention_resolutions"])
    channels = [width * m for m in model["channel_mult"]]
    first_attn = next((c for c, r in zip(channels, res) if r in attn), channels[-1])
    head_dim = model["head_channels"] or first_attn // model["num_heads"]  # same head width as ours
    return UNet2DModel(
        sample_size=model["resolution"], in_channels=model["in_channels"], out_channels=model["out_channels"],
        down_block_types=tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res),
        up_block_types=tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res)),
        block_out_channels=tuple(channels), layers_per_block=model["num_res_blocks"],
        downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
        attention_head_dim=head_dim, norm_num_groups=model["norm_groups"], norm_eps=1e-6, dropout=0.0,
        add_attention=True, time_embedding_type="positional",
    )


def matched_width(model: dict, target: int) -> int:
    """diffusers base width (a multiple of the norm groups) with the parameter count closest to `target`."""
    g = model["norm_groups"]
    best = None
    for w in range(g, 4 * model["base_channels"] + 1, g):
        with torch.device("meta"):
            n = sum(p.numel() for p in diffusers_model(model, w).parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (w, n)
    return best[0]


def make_step(net, call, batch: int, model: dict, device: torch.device):
    torch.manual_seed(0)
    r, c = model["resolution"], model["in_channels"]
    x = torch.randn(batch, c, r, r, device=device)
    target = torch.randn(batch, model["out_channels"], r, r, device=device)
    u = torch.rand(batch, device=device)
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True if cuda else None, foreach=None if cuda else True)
    net.train()

    def step() -> None:
        loss = torch.nn.functional.mse_loss(call(x, u), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device) -> float:
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def profile(label: str, step, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        step()
    print(f"\n-- profile, {label}: one step, ops by self time --")
    print(p.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                                 row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=("small", "table1"), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--profile", action="store_true", help="print each step's profile (also printed when ratio > 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}; device {device}")

    model = ours_config(args.config)
    torch.manual_seed(0)
    ours = build_unet(model).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    width = matched_width(model, n_ours)
    theirs = diffusers_model(model, width).to(device)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    r = model["resolution"]
    print(f"ours:   sferd U-Net ({args.config}), base {model['base_channels']}, mult {model['channel_mult']}, "
          f"{model['num_res_blocks']} res-blocks, attention {model['attention_resolutions']}: {n_ours / 1e6:.2f} M params")
    print(f"theirs: diffusers UNet2DModel, block_out_channels "
          f"{tuple(width * m for m in model['channel_mult'])}, {model['num_res_blocks']} layers per block: "
          f"{n_theirs / 1e6:.2f} M params ({n_theirs / n_ours:.3f}× ours)")
    print(f"step: {r}×{r}×{model['in_channels']}, batch {args.batch}, fp32, forward + MSE + backward + Adam; "
          f"{args.repeats} interleaved repetitions after 1 warm-up each")

    step_ours = make_step(ours, lambda x, u: ours(x, u), args.batch, model, device)
    step_theirs = make_step(theirs, lambda x, u: theirs(x, u * 1000.0).sample, args.batch, model, device)
    timed(step_ours, device)
    timed(step_theirs, device)
    t_ours, t_theirs = [], []
    for k in range(args.repeats):
        pair = [("ours", step_ours, t_ours), ("theirs", step_theirs, t_theirs)]
        for _, step, times in (pair if k % 2 == 0 else pair[::-1]):  # alternate who goes first
            times.append(timed(step, device))
    m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    ratios = [a / b for a, b in zip(t_ours, t_theirs)]
    print(f"ours:   median {m_ours * 1e3:.1f} ms/step ({args.batch / m_ours:.2f} images/s); "
          f"all: {', '.join(f'{t * 1e3:.0f}' for t in t_ours)}")
    print(f"theirs: median {m_theirs * 1e3:.1f} ms/step ({args.batch / m_theirs:.2f} images/s); "
          f"all: {', '.join(f'{t * 1e3:.0f}' for t in t_theirs)}")
    ratio = m_ours / m_theirs
    print(f"ratio ours/theirs: {ratio:.3f}× (medians); median of per-repetition ratios "
          f"{statistics.median(ratios):.3f}×; target ≤ 1.0×: {'met' if ratio <= 1.0 else 'NOT met'}")
    if args.profile or ratio > 1.0:
        profile("ours", step_ours, 15)
        profile("theirs", step_theirs, 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
