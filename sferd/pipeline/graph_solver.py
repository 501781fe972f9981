"""Stages of a `kind: solver` method: the spec's VP teacher sampled by a named sampler, no training.

Per evaluated NFE N: for a D-ODE sampler (d_ddim, d_gddim) a `dode_calibration` stage that fits the N λ's on one
calibration batch and writes them as JSON (sferd/pipeline/stages/dode_calibration.py), then an FID stage of source
kind `solver` (runner `fid_solver`) that samples with `sferd.diffusion.samplers.make_sampler` and, for D-ODE, the
λ file. Calibration stages depend only on the teacher and their own params, so two methods (or two specs) asking for
the same fit share one stage, named after the first method that needs it (as distillation chains are).
Pure: no I/O, no torch.
"""

from __future__ import annotations

import json
from typing import Any

from sferd.pipeline.graph import GraphContext, Stage, metrics_path, stage_dir, steps_tag
from sferd.spec.models import DODE_SAMPLERS, ORDERED_SAMPLERS, SolverMethod

CALIBRATION_KIND = "dode_calibration"
LAMBDAS_FILE = "lambdas.json"
# Sampling clips x̂₀ to [−1, 1] and re-derives ε̂ (PD's eval_clip_denoised), as the teacher's DDIM rows do; the
# calibration fits the λ's of that same clipped sampler.
CLIP = True


def _solver(base: str, order: int | None) -> dict[str, Any]:
    return {"base": base, **({"order": order} if base == "gddim" else {})}


def calibration_stage(ctx: GraphContext, method: SolverMethod, steps: int) -> Stage:
    cal = method.calibration
    assert cal is not None  # validated: d_* samplers have one
    t = ctx.spec.teacher
    teacher_steps = cal.teacher_steps_for(steps)
    params = {
        "kind": CALIBRATION_KIND,
        "student_steps": steps,
        "sampler": _solver(method.base, method.order),
        "teacher_solver": _solver(cal.teacher_sampler, cal.teacher_order),
        "teacher_steps": teacher_steps,
        "factor": teacher_steps // steps,
        "clip": CLIP,
        "batch_size": cal.batch_size,
        "seed": cal.seed,
        # the network sees the batch in chunks of this size, the same chunks for any process count (a rank takes
        # whole chunks), so the λ's are bit-identical for 1 or N processes
        "chunk_size": ctx.spec.evaluation.sample_batch_size,
        "teacher": {"checkpoint": f"{ctx.teacher_dir}/model.pt", "model": ctx.teacher_model,
                    "parameterization": t.parameterization},
    }
    key = json.dumps(params, sort_keys=True)
    owner = ctx.shared.setdefault(f"dode:{key}", method.name)
    name = f"{ctx.prefix}-{owner}-{steps_tag(steps)}-calibration"
    d = stage_dir(name)
    return Stage(
        name=name,
        kind=CALIBRATION_KIND,
        params={**params, "outputs": {"dir": d, "lambdas": f"{d}/{LAMBDAS_FILE}", "metrics": metrics_path(name)}},
        deps=(ctx.teacher_dir,),
        outs=(d,),
        metrics=(metrics_path(name),),
        # teacher run (K·N), the fit (N) and the measured base/corrected runs (2N), one network pass each per image
        cost={"forward_passes": float(cal.batch_size * (teacher_steps + 3 * steps))},
        group=f"{ctx.prefix}-{owner}-calibration" if ctx.by_row else None,
    )


def build_solver(ctx: GraphContext, method: SolverMethod) -> None:
    t = ctx.spec.teacher
    for steps in method.nfes(ctx.spec.evaluation):
        sampler: dict[str, Any] = {"name": method.sampler, "clip": CLIP}
        if method.sampler in ORDERED_SAMPLERS:
            sampler["order"] = method.order
        source: dict[str, Any] = {"kind": "solver", "checkpoint": f"{ctx.teacher_dir}/model.pt",
                                  "model": ctx.teacher_model, "parameterization": t.parameterization,
                                  "sampler": sampler}
        deps: tuple[str, ...] = (ctx.teacher_dir,)
        if method.sampler in DODE_SAMPLERS:
            cal = calibration_stage(ctx, method, steps)
            if ctx.shared.get(f"stage:{cal.name}") is None:  # a shared fit is added once
                ctx.shared[f"stage:{cal.name}"] = True
                ctx.add_stage(cal)
            source["lambdas"] = cal.params["outputs"]["lambdas"]
            deps = (ctx.teacher_dir, cal.outs[0])
        ctx.add_fid(f"{ctx.prefix}-{method.name}-{steps_tag(steps)}-fid", method.name, method.label, steps, source,
                    deps, steps, group=f"{ctx.prefix}-{method.name}-fid")
