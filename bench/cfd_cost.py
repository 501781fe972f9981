"""Cost of a CFD halving update relative to a PD halving update, measured side by side in one run.

Usage (repository root, project venv active):
    python bench/cfd_cost.py                 # the quickstart's U-Net + digits-cnn; a 32×32 U-Net + ResNet-18
    python bench/cfd_cost.py --densenet      # also a 32×32 U-Net + DenseNet-201 (slow on a CPU)
    python bench/cfd_cost.py --tiny          # the CI configuration (tests/test_bench_cfd_tiny.py)

One update = the loss (sferd.methods.pd.pd_loss or sferd.methods.cfd.cfd_loss, the same training point and
teacher target), backward and an Adam step of the student. CFD adds two classifier forwards (teacher target under
no_grad, student x̂₀) and a backward through the classifier to its input; its cost relative to PD depends on how
large the classifier is next to the U-Net, which is why the ratio is printed per (U-Net, classifier) pair. PD and
CFD updates alternate (interleaved repeats, median), so both see the same machine load.
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
from sferd.methods.cfd import cfd_loss  # noqa: E402
from sferd.methods.draws import GeneratorDraws  # noqa: E402
from sferd.methods.pd import pd_loss  # noqa: E402
from sferd.nn.classifiers import Classifier  # noqa: E402
from sferd.nn.unet import UNet, UNetConfig  # noqa: E402
from sferd.util.machine import describe, machine_record  # noqa: E402


def _perturbed(cfg: UNetConfig, seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(cfg)
    with torch.no_grad():  # zero-initialised output layers would give a constant x̂₀
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def measure(cfg: UNetConfig, classifier: dict, batch: int, repeats: int, steps: int = 4) -> tuple[float, float]:
    """Median seconds of one PD and one CFD update (β > 0: the dataset term is computed too)."""
    teacher = NetworkDenoiser(_perturbed(cfg, 0).eval().requires_grad_(False), "x")
    student_net = _perturbed(cfg, 1).train()
    student = NetworkDenoiser(student_net, "x")
    torch.manual_seed(2)
    clf = Classifier(classifier).eval().requires_grad_(False)
    opt = torch.optim.Adam(student_net.parameters(), lr=1e-5)
    x0 = torch.rand(batch, cfg.in_channels, cfg.resolution, cfg.resolution) * 2 - 1
    gen = torch.Generator().manual_seed(0)

    def pd():
        opt.zero_grad(set_to_none=True)
        pd_loss(student, teacher, x0, steps, GeneratorDraws(gen, batch)).mean().backward()
        opt.step()

    def cfd():
        opt.zero_grad(set_to_none=True)
        cfd_loss(student, teacher, x0, steps, GeneratorDraws(gen, batch), classifier=clf, temperature=0.95,
                 beta=0.003, gamma=0.75).mean().backward()
        opt.step()

    pd(), cfd()  # warm-up
    times: dict[str, list[float]] = {"pd": [], "cfd": []}
    for _ in range(repeats):
        for name, fn in (("pd", pd), ("cfd", cfd)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["pd"]), statistics.median(times["cfd"])


def _quickstart_unet() -> tuple[UNetConfig, int]:
    from sferd.nn.build import unet_config
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "specs/quickstart.yaml")
    st = next(s for s in build_graph(spec, spec_path="specs/quickstart.yaml") if s.kind == "distill")
    return unet_config(st.params["model"]), st.params["training"]["batch_size"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="batch 2, a tiny 8×8 U-Net and digits-cnn, 2 repeats")
    ap.add_argument("--densenet", action="store_true", help="also DenseNet-201 at 32×32 (slow on a CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    digits = {"architecture": "digits-cnn", "channels": 1, "resolution": 8, "num_classes": 10, "pretrained": False}
    if args.tiny:
        cases = [("tiny U-Net 8×8 (base 8)", UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), norm_groups=4),
                  {**digits, "width": 8, "feature_dim": 8}, 2)]
        repeats = 2
    else:
        quick, quick_batch = _quickstart_unet()
        cifar_unet = UNetConfig(3, 3, 32, 64, (1, 2, 2), 2, (16,), norm_groups=32)
        cifar = {"channels": 3, "resolution": 32, "num_classes": 10, "pretrained": False}
        cases = [("quickstart U-Net 8×8", quick, {**digits, "width": 32, "feature_dim": 64}, quick_batch),
                 ("U-Net 32×32 (base 64, mult 1,2,2, attn 16)", cifar_unet, {**cifar, "architecture": "resnet18"}, 16)]
        if args.densenet:
            cases.append(("U-Net 32×32 (base 64, mult 1,2,2, attn 16)", cifar_unet,
                          {**cifar, "architecture": "densenet201"}, 16))
        repeats = args.repeats
    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}")
    print(f"median of {repeats} interleaved repeat(s)" + (" — TINY configuration" if args.tiny else ""))
    for label, cfg, clf, batch in cases:
        t_pd, t_cfd = measure(cfg, clf, batch, repeats)
        print(f"== {label} + {clf['architecture']} classifier, batch {batch}")
        print(f"PD update   {1000 * t_pd:9.1f} ms")
        print(f"CFD update  {1000 * t_cfd:9.1f} ms   {t_cfd / t_pd:.2f}× PD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
