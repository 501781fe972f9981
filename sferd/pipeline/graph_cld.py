"""Stages of a `cld` method (gDDIM on critically-damped Langevin diffusion): its CLD teacher, trained by a
`cld_teacher` stage shared by every row whose teacher block has the same name, then one `fid_cld` stage per
evaluated NFE (`evaluation.student_steps`). Pure, like graph.py.

Names: `<prefix>-<teacher name>-teacher` (e.g. `digits-cld-teacher`), `<prefix>-<method>-s0050-fid`. The spec's
VP teacher stays in the graph (every spec has one), untouched by these rows.
"""

from __future__ import annotations

from typing import Any

from sferd.pipeline.graph import GraphContext, Stage, metrics_path, stage_dir, steps_tag
from sferd.spec.models import CLDMethod


def cld_model_config(ctx: GraphContext, method: CLDMethod) -> dict[str, Any]:
    """The U-Net the runner builds: 2C channels in (x then v) and out (ε of x then of v)."""
    m = method.teacher.model.model_dump(mode="json")
    channels = ctx.spec.dataset.channels
    m["in_channels"] = m["out_channels"] = 2 * channels
    m["resolution"] = ctx.spec.dataset.resolution
    m["num_classes"] = ctx.spec.dataset.num_classes if m.pop("class_conditional") else None
    return m


def build_cld(ctx: GraphContext, method: CLDMethod) -> None:
    t = method.teacher
    name = f"{ctx.prefix}-{t.name}-teacher"
    out_dir = stage_dir(name)
    model = cld_model_config(ctx, method)
    process = t.process.model_dump(mode="json")
    teachers: dict[str, Any] = ctx.shared.setdefault("cld_teachers", {})
    if name not in teachers:  # checks.py guarantees equal settings under one name
        teachers[name] = t.stage_params()
        ctx.add_stage(Stage(
            name=name,
            kind="cld_teacher",
            params={
                "kind": "cld_teacher",
                "seed": ctx.spec.seed,
                "precision": ctx.spec.precision,
                "dataset": ctx.dataset,
                "model": model,
                "process": process,
                "mixed_score": t.mixed_score,
                "training": t.model_dump(mode="json", exclude={"kind", "name", "model", "process", "mixed_score"}),
                "inputs": {"train": ctx.train_split},
                "outputs": {"dir": out_dir, "metrics": metrics_path(name)},
            },
            deps=(ctx.data_dir,),
            outs=(out_dir,),
            metrics=(metrics_path(name),),
            # forward + backward ≈ 3 passes per image, of the CLD U-Net (`plan` prices passes at the VP teacher's FLOPs)
            cost={"forward_passes": 3.0 * t.updates * t.batch_size},
        ))
    sampler = method.sampler.model_dump(mode="json")
    for nfe in method.nfes(ctx.spec.evaluation):
        source = {"kind": "cld", "checkpoint": f"{out_dir}/model.pt", "model": model, "process": process,
                  "mixed_score": t.mixed_score, "sampler": sampler}
        ctx.add_fid(f"{ctx.prefix}-{method.name}-{steps_tag(nfe)}-fid", method.name, method.label, nfe, source,
                    (out_dir,), nfe, group=f"{ctx.prefix}-{method.name}-fid")
