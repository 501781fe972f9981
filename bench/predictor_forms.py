"""Does SFERD's stage (b) learn? Held-out stage-(b) loss with G = 0 vs a trained G, per shift parameterisation
and student K (issue 11 §1; sferd-method.md §7, §9(b), D15).

Usage (repository root, project venv active):
    python bench/predictor_forms.py --chain-cache /tmp/pf-chain.pt   # teacher + guided chain trained here (and
                                                                     # kept for re-runs), then the grid
    python bench/predictor_forms.py --teacher-updates 2000 --halving-updates 300   # the quickstart's full sizes
    python bench/predictor_forms.py --forms x0_tweedie x0_direct --lrs 1e-6 1e-4

What it does, in one process, at the quickstart's resolved settings (read from the committed params file, so the
numbers follow the spec):
1. digits 8×8 with the quickstart's train/held-out split; a teacher of the quickstart's U-Net and optimiser
   (`--teacher-updates`, default 800 rather than the spec's 2000, to save time), then the attention-guided PD
   chain 16 → 8 → 4 → 2 → 1 (`--halving-updates` per halving, default 150 rather than 300; Adam, linear decay).
2. For every student K of the quickstart (1, 2, 4, 8) and every form: stage (b) exactly
   as the predictor stage runs it — frozen S_K and guided T_2K, a fresh encoder + predictor started from the
   student's decoder, the spec's updates, batch, grad clip and EMA, `sferd.methods.sferd.predictor_loss` — and
   the EMA weights evaluated. Every lr of `--lrs` is tried at the `--grid-steps` students (default K = 1, the
   case that matters); the other K reuse each form's lr selected there.
3. Evaluation: the per-sample stage-(b) loss on held-out digits (never trained on), each image with
   `--eval-repeats` noise/time draws; G = 0 is the student itself (a fresh predictor's head is zero). The same
   draws serve every row, so differences are paired. The held-out images are split in two halves: the learning
   rate of each form is chosen on the first half ("select"), and the table reports the second ("report"),
   so the chosen row is not scored on the data that chose it.

Prints the machine (CPU, threads, torch), the command, the full grid and the summary table. Measured cost with
the defaults on a shared 2-core Xeon (load ~4): teacher 357 s, chain 370 s, 21 stage-(b) runs 30–65 s each,
27 min in all; with a cached chain, about 40 s per (K, form, lr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sferd.data.arrays import to_model_range  # noqa: E402
from sferd.data.digits import load_digits_uint8, stratified_split  # noqa: E402
from sferd.diffusion.denoiser import NetworkDenoiser  # noqa: E402
from sferd.methods.draws import GeneratorDraws  # noqa: E402
from sferd.methods.guidance import teacher_denoiser  # noqa: E402
from sferd.methods.pd import pd_loss  # noqa: E402
from sferd.methods.sferd import SHIFT_PARAMETERIZATIONS, predictor_loss  # noqa: E402
from sferd.methods.teacher import teacher_loss  # noqa: E402
from sferd.methods.training import EMA, linear_to_zero, warmup_constant  # noqa: E402
from sferd.nn.build import build_unet  # noqa: E402
from sferd.nn.predictor import GradientPredictor  # noqa: E402
from sferd.pipeline.stages.predictor import build_encoder  # noqa: E402
from sferd.util.machine import cpu_model  # noqa: E402


def _load_params(path: Path, method: str) -> dict[str, dict]:
    """The quickstart's resolved stage params: teacher, the method's halvings and predictor stages."""
    params = json.loads(path.read_text())
    prefix = "digits"
    out = {"teacher": params[f"{prefix}-teacher"]}
    for k in (1, 2, 4, 8):
        out[f"distill-{k}"] = params[f"{prefix}-{method}-s{k:04d}"]
        out[f"predictor-{k}"] = params[f"{prefix}-{method}-s{k:04d}-predictor"]
    return out


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _batches(x: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Uniformly drawn training batches (with replacement across batches), from a fixed generator."""
    while True:
        yield x[torch.randint(0, len(x), (batch_size,), generator=gen)]


def _train(params, loss_fn, *, updates: int, batch_size: int, lr: float, lr_lambda, clip: float,
           data: torch.Tensor, seed: int, ema: EMA | None = None, weight_decay: float = 0.0,
           trainable: torch.nn.Module | None = None) -> float:
    """Adam (AdamW with a decay) + global-norm clip + EMA on the mean per-sample loss, as the training engine does.
    Returns the mean training loss of the last 20 updates."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay else \
        torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, gen)
    recent = []
    for step in range(updates):
        for g in opt.param_groups:
            g["lr"] = lr * lr_lambda(step)
        opt.zero_grad(set_to_none=True)
        x0 = next(batches)
        loss = loss_fn(x0, GeneratorDraws(gen, batch_size)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if ema is not None:
            ema.update(trainable)
        recent = (recent + [float(loss.detach())])[-20:]
    if not all(map(_finite, recent)):
        return float("nan")
    return sum(recent) / len(recent)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--params", type=Path, default=ROOT / "params.json",
                    help="the compiled quickstart params (default: params.json at the repository root)")
    ap.add_argument("--method", default="sferd", help="the quickstart method whose chain and predictor to use")
    ap.add_argument("--teacher-updates", type=int, default=800, help="teacher updates (spec: 2000)")
    ap.add_argument("--halving-updates", type=int, default=150, help="updates per halving (spec: 300)")
    ap.add_argument("--predictor-updates", type=int, default=None, help="stage-(b) updates (default: the spec's)")
    ap.add_argument("--forms", nargs="+", default=list(SHIFT_PARAMETERIZATIONS), choices=SHIFT_PARAMETERIZATIONS)
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-6, 1e-5, 1e-4, 1e-3],
                    help="stage-(b) Adam learning rates tried for every form at the --grid-steps students")
    ap.add_argument("--grid-steps", nargs="+", type=int, default=[1],
                    help="students K that try every lr; the others use each form's lr selected at the first of these")
    ap.add_argument("--chain-cache", type=Path, default=None,
                    help="save the teacher and chain here, or load them if the file exists (same settings only)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8], help="student K")
    ap.add_argument("--eval-repeats", type=int, default=4, help="noise/time draws per held-out image")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    print(f"machine: {cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); python {platform.python_version()}")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")

    p = _load_params(args.params, args.method)
    tp = p["teacher"]
    ds = tp["dataset"]
    images, labels = load_digits_uint8(tp["model"]["resolution"])
    train_idx, held_idx = stratified_split(labels, ds["heldout_fraction"], ds["split_seed"])
    train = to_model_range(images[train_idx])
    held = to_model_range(images[held_idx])
    half = len(held) // 2
    evalsets = {"select": held[:half], "report": held[half:]}
    print(f"data: digits {tuple(train.shape[1:])}, {len(train)} train / {len(held)} held-out "
          f"({half} select + {len(held) - half} report)")

    def trains(stage: dict) -> dict:
        """What decides a trained network (not output paths); a params file without `precision` is fp32."""
        keep = ("dataset", "model", "training", "guidance", "parameterization", "loss_weighting", "student_steps")
        return {**{k: stage[k] for k in keep if k in stage}, "precision": stage.get("precision", "fp32")}

    if any(trains(st)["precision"] != "fp32" for st in [tp] + [p[f"distill-{k}"] for k in (8, 4, 2, 1)]):
        raise SystemExit("the bench trains in fp32; this params file asks for another precision")
    chain_key = {"teacher_updates": args.teacher_updates, "halving_updates": args.halving_updates,
                 "seed": args.seed, "teacher": trains(tp), "chain": [trains(p[f"distill-{k}"]) for k in (8, 4, 2, 1)]}
    tr = tp["training"]
    if args.chain_cache is not None and args.chain_cache.exists():
        cached = torch.load(args.chain_cache, weights_only=True)
        if cached["key"] != json.dumps(chain_key, sort_keys=True):
            raise SystemExit(f"{args.chain_cache} holds a chain trained with other settings; delete it or pass "
                             "another --chain-cache")
        nets = {}
        for k, sd in cached["nets"].items():
            nets[int(k)] = build_unet(tp["model"])
            nets[int(k)].load_state_dict(sd)
            nets[int(k)].eval().requires_grad_(False)
        print(f"teacher and chain loaded from {args.chain_cache}")
    else:
        # ---- teacher (quickstart model and optimiser, fewer updates by default)
        param_kind, weighting = tr["parameterization"], tr["loss_weighting"]
        net = build_unet(tp["model"])
        ema = EMA(net, tr["ema_decay"])
        den = NetworkDenoiser(net, param_kind)
        t0 = time.perf_counter()
        loss = _train(list(net.parameters()), lambda x0, d: teacher_loss(den, x0, d, weighting=weighting),
                      updates=args.teacher_updates, batch_size=tr["batch_size"], lr=tr["lr"],
                      lr_lambda=warmup_constant(tr["warmup_updates"]), clip=tr["grad_clip_norm"], data=train,
                      seed=args.seed, ema=ema, weight_decay=tr["weight_decay"], trainable=net)
        print(f"teacher: {args.teacher_updates} updates, final loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
        nets = {16: ema.model.eval()}

        # ---- the chain 16 → … → 1 with the method's (guided) teacher
        for k in (8, 4, 2, 1):  # the whole chain: K = 1 needs every halving before it
            dp = p[f"distill-{k}"]
            teacher_net = nets[2 * k]
            student_net = build_unet(dp["model"])
            student_net.load_state_dict(teacher_net.state_dict())
            teacher = teacher_denoiser(teacher_net, dp["parameterization"], dp["guidance"])
            student = NetworkDenoiser(student_net, dp["parameterization"])
            t0 = time.perf_counter()
            dtr = dp["training"]
            loss = _train(list(student_net.parameters()),
                          lambda x0, d: pd_loss(student, teacher, x0, k, d, weighting=dp["loss_weighting"]),
                          updates=args.halving_updates, batch_size=dtr["batch_size"], lr=dtr["lr"],
                          lr_lambda=linear_to_zero(args.halving_updates), clip=dtr["grad_clip_norm"], data=train,
                          seed=args.seed + k)
            nets[k] = student_net.eval().requires_grad_(False)
            print(f"halving {2 * k} → {k}: {args.halving_updates} updates, final loss {loss:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)")

        if args.chain_cache is not None:
            torch.save({"key": json.dumps(chain_key, sort_keys=True),
                        "nets": {str(k): n.state_dict() for k, n in nets.items()}}, args.chain_cache)

    # ---- stage (b) per K, form, lr
    rows = []
    grid = [k for k in args.grid_steps if k in args.steps]
    chosen_lr: dict[str, float] = {}  # per form, selected at grid[0] on the 'select' half
    for k in grid + [k for k in args.steps if k not in grid]:
        if k not in grid and not chosen_lr:
            for form in args.forms:
                cand = [r for r in rows if r["k"] == grid[0] and r["form"] == form and _finite(r["select"][1])]
                chosen_lr[form] = min(cand, key=lambda r: r["select"][1])["lr"] if cand else min(args.lrs)
            print(f"learning rates selected at K = {grid[0]}: {chosen_lr}")
        pp = p[f"predictor-{k}"]
        pr = pp["predictor"]
        updates = args.predictor_updates or pr["updates"]
        teacher = teacher_denoiser(nets[2 * k], pp["parameterization"], pp["guidance"])

        def make(seed: int):
            torch.manual_seed(seed)  # the same initial encoder/predictor for every form and lr
            encoder = build_encoder(pp["encoder"])
            predictor = GradientPredictor(nets[k], latent_dim=pp["encoder"]["latent_dim"],
                                          init_from_student=pr["init_from_student"])
            return encoder, predictor

        @torch.no_grad()
        def heldout(encoder, predictor, form) -> dict[str, torch.Tensor]:
            """Per-sample held-out loss (every image × eval_repeats fixed draws) on each half."""
            out = {}
            for name, x in evalsets.items():
                vals = []
                for r in range(args.eval_repeats):
                    draws = GeneratorDraws(torch.Generator().manual_seed(10_000 + 97 * r + k), len(x))
                    vals.append(predictor_loss(encoder=encoder, predictor=predictor, teacher=teacher,
                                               parameterization=pp["parameterization"], x0=x, num_steps=k,
                                               draws=draws, weighting=pp["loss_weighting"],
                                               shift_parameterization=form))
                out[name] = torch.cat(vals).double()
            return out

        enc0, pred0 = make(args.seed)
        base = heldout(enc0.eval(), pred0.eval(), args.forms[0])  # G ≡ 0: the same for every form
        for form in args.forms:
            for lr in (args.lrs if k in grid else [chosen_lr[form]]):
                encoder, predictor = make(args.seed)
                trainable = torch.nn.ModuleDict({"encoder": encoder, "predictor": predictor})
                ema = EMA(trainable, pr["ema_decay"])
                params = list(encoder.parameters()) + list(predictor.trainable_parameters())
                t0 = time.perf_counter()
                train_loss = _train(
                    params,
                    lambda x0, d: predictor_loss(encoder=encoder, predictor=predictor, teacher=teacher,
                                                 parameterization=pp["parameterization"], x0=x0, num_steps=k,
                                                 draws=d, weighting=pp["loss_weighting"],
                                                 shift_parameterization=form),
                    updates=updates, batch_size=pr["batch_size"], lr=lr, lr_lambda=warmup_constant(0),
                    clip=pr["grad_clip_norm"], data=train, seed=args.seed + 1000 + k, ema=ema, trainable=trainable,
                )
                final = ema.model.eval()
                got = heldout(final["encoder"], final["predictor"], form)
                row = {"k": k, "form": form, "lr": lr, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
                       "lr_from": "grid" if k in grid else f"K={grid[0]}"}
                for name in evalsets:
                    b, g = base[name], got[name]
                    diff = g - b  # paired: same images, same draws
                    row[name] = (float(b.mean()), float(g.mean()), float(diff.mean() / b.mean()),
                                 float(diff.std() / diff.numel() ** 0.5 / b.mean()))
                rows.append(row)
                s = row["report"]
                print(f"  K={k} {form:10s} lr={lr:7.0e}: held-out(report) G=0 {s[0]:.5g} → trained {s[1]:.5g} "
                      f"({100 * s[2]:+.2f}% ± {100 * s[3]:.2f}), select {100 * row['select'][2]:+.2f}% "
                      f"({row['seconds']:.0f} s)", flush=True)

    print()
    print(f"Stage-(b) held-out loss, G = 0 vs trained G ({updates} updates at the spec's batch/EMA/clip; lr chosen per "
          f"form on the 'select' half, scored on the 'report' half; ± is the paired standard error):")
    print()
    print("| K | form | lr (selected) | loss, G = 0 | loss, trained G | relative change |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in args.steps:
        for form in args.forms:
            cand = [r for r in rows if r["k"] == k and r["form"] == form and _finite(r["select"][1])]
            if not cand:
                print(f"| {k} | {form} | – | | | not finite at every lr |")
                continue
            best = min(cand, key=lambda r: r["select"][1])
            b, g, rel, se = best["report"]
            where = "" if best["lr_from"] == "grid" else f" (from {best['lr_from']})"
            print(f"| {k} | {form} | {best['lr']:.0e}{where} | {b:.5g} | {g:.5g} | {100 * rel:+.2f}% ± {100 * se:.2f} |")
    print()
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
