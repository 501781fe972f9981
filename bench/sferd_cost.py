"""Cost of SFERD relative to PD, on the same model and batch (issue 3's target: training step ≤ 1.5× PD).

Usage (repository root, project venv active):
    python bench/sferd_cost.py              # the quickstart's U-Net (from specs/quickstart.yaml) and a 32×32 one
    python bench/sferd_cost.py --repeats 20

Training: one SFERD-PD halving update (attention-guided teacher on both PD sub-steps: 4 teacher passes, the
attention map computed only in the selected block) divided by one PD update (2 teacher passes), both with the
student's forward, backward and Adam step. Counting a backward as two forwards, the network evaluations give
(4 + 3) / (2 + 3) = 1.4× — the reference the measured ratio is printed against.

Sampling: a SFERD student with its predictor branch (shift on for K − ⌊0.3K⌋ steps) divided by the plain
student, for K = 1, 2, 4, 8; the latent-prior DDIM that draws z is timed separately and in the total.
Timings are medians over repeats after a warm-up, on the threads torch picks (2 cores here).
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
from sferd.diffusion.sampler import ddim_sample  # noqa: E402
from sferd.methods.guidance import GuidanceConfig, GuidedDenoiser  # noqa: E402
from sferd.methods.latent_prior import LatentDiffusion  # noqa: E402
from sferd.methods.draws import GeneratorDraws  # noqa: E402
from sferd.methods.pd import pd_loss  # noqa: E402
from sferd.methods.sferd import sample_sferd  # noqa: E402
from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig  # noqa: E402
from sferd.nn.predictor import GradientPredictor  # noqa: E402
from sferd.nn.unet import UNet, UNetConfig  # noqa: E402

FLOP_REFERENCE = (4 + 3) / (2 + 3)  # sferd-method.md §5: teacher passes + student forward/backward


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _perturbed(cfg: UNetConfig, seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(cfg)
    with torch.no_grad():  # zero-initialised output layers would make the attention maps degenerate
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def training_ratio(cfg: UNetConfig, guidance: GuidanceConfig, batch: int, repeats: int) -> tuple[float, float]:
    teacher_net = _perturbed(cfg, 0).eval()
    student_net = _perturbed(cfg, 1).train()
    student = NetworkDenoiser(student_net, "x")
    opt = torch.optim.Adam(student_net.parameters(), lr=1e-5)
    x0 = torch.rand(batch, cfg.in_channels, cfg.resolution, cfg.resolution) * 2 - 1
    gen = torch.Generator().manual_seed(0)

    def step(teacher):
        def run():
            opt.zero_grad(set_to_none=True)
            pd_loss(student, teacher, x0, 4, GeneratorDraws(gen, x0.shape[0])).mean().backward()
            opt.step()
        return run

    t_pd = _median_time(step(NetworkDenoiser(teacher_net, "x")), repeats)
    t_sferd = _median_time(step(GuidedDenoiser(teacher_net, "x", guidance)), repeats)
    return t_pd, t_sferd


def sampling_ratios(cfg: UNetConfig, batch: int, latent_dim: int, repeats: int) -> list[tuple[int, float, float, float]]:
    student = _perturbed(cfg, 1).eval()
    predictor = GradientPredictor(student, latent_dim=latent_dim, init_from_student=True).eval()
    mlp = LatentMLP(LatentMLPConfig(latent_dim=latent_dim, width=256, num_layers=4)).eval()
    diffusion = LatentDiffusion()
    noise = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    z_t = torch.randn(batch, latent_dim)
    rows = []
    with torch.no_grad():
        t_prior = _median_time(lambda: diffusion.ddim_sample(mlp, z_t, steps=100), repeats)
        for k in (1, 2, 4, 8):
            t_plain = _median_time(lambda: ddim_sample(NetworkDenoiser(student, "x"), noise, k, clip=True), repeats)
            t_sferd = _median_time(lambda: sample_sferd(predictor=predictor, student=student, parameterization="x",
                                                        noise=noise, z=z_t, num_steps=k, cutoff_fraction=0.3,
                                                        shift_parameterization="x0_tweedie"), repeats)
            rows.append((k, t_plain, t_sferd, t_prior))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from sferd.nn.build import unet_config
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "specs/quickstart.yaml")
    chain = next(s for s in build_graph(spec, spec_path="specs/quickstart.yaml") if s.kind == "distill" and s.params["guidance"])
    quick_cfg = unet_config(chain.params["model"])
    guidance = GuidanceConfig.from_params(chain.params["guidance"])
    models = [
        ("quickstart U-Net 8×8", quick_cfg, guidance, chain.params["training"]["batch_size"]),
        ("U-Net 32×32 (base 64, mult 1,2,2, attn 16)",
         UNetConfig(3, 3, 32, 64, (1, 2, 2), 2, (16,), norm_groups=32),
         GuidanceConfig(block=("decoder", 16, "last")), 16),
    ]
    print(f"reference: network evaluations give {FLOP_REFERENCE:.2f}× (target ≤ 1.5×); torch threads {torch.get_num_threads()}")
    for label, cfg, guide, batch in models:
        t_pd, t_sferd = training_ratio(cfg, guide, batch, args.repeats)
        print(f"\n{label}, batch {batch}")
        print(f"  training step  PD {t_pd * 1e3:8.1f} ms   SFERD-PD {t_sferd * 1e3:8.1f} ms   ratio {t_sferd / t_pd:.2f}×"
              f"   (vs {FLOP_REFERENCE:.2f}× reference: {t_sferd / t_pd / FLOP_REFERENCE:.2f})")
        for k, t_plain, t_sferd_s, t_prior in sampling_ratios(cfg, batch, 64, args.repeats):
            print(f"  sampling K={k}   student {t_plain * 1e3:7.1f} ms   with predictor {t_sferd_s * 1e3:7.1f} ms"
                  f"   ratio {t_sferd_s / t_plain:.2f}×   + latent prior (100 steps) {t_prior * 1e3:6.1f} ms"
                  f"   total ratio {(t_sferd_s + t_prior) / t_plain:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
