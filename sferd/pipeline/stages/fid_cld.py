"""Stage `fid_cld`: FID of a CLD teacher sampled with gDDIM of order q or with plain Euler on its probability flow
(sferd/diffusion/cld.py), through `fid.run`'s sampler hook: the samples, seeds, sharding and metrics file are the
usual ones. Each sample's noise (B, 2C, H, W) comes from its own seed, as every FID stage's does; its two halves
are the x and v noise of the start state u₁ = R₁ ξ. The image is the x component at t_min, with no extra
denoising evaluation, so NFE = steps. The metrics add the sampler, its order and the CLD constants."""

from __future__ import annotations

from sferd.pipeline.stages import fid
from sferd.util.errors import StageError


def _checked_process(src: dict):
    """The CLD the checkpoint was trained with must be the one sampled: a VP checkpoint, or another CLD, is refused
    before any sampling."""
    from sferd.methods.cld_teacher import cld_process
    from sferd.util.artifacts import torch_load

    ckpt = torch_load(src["checkpoint"])
    cfg = ckpt.get("config", {})
    if cfg.get("kind") != "cld_teacher":
        raise StageError(f"{src['checkpoint']} was written by a {cfg.get('kind')!r} stage, not a CLD teacher "
                         "(`cld_teacher`): a CLD sampler needs an ε-model of the (x, v) state")
    if cfg.get("mixed_score") != src["mixed_score"]:
        raise StageError(f"{src['checkpoint']} was trained with mixed_score {cfg.get('mixed_score')}, but this stage "
                         f"samples with {src['mixed_score']}: re-run the teacher stage")
    if cfg.get("process") != src["process"]:
        raise StageError(f"{src['checkpoint']} was trained with CLD constants {cfg.get('process')}, but this stage "
                         f"samples {src['process']}: re-run the teacher stage")
    return cld_process(src["process"])


def make_sampler(src: dict, net, num_steps: int):
    """`sample(noise, seeds, y)` → images (B, C, H, W) for a CLD network (2C channels in and out)."""
    from sferd.diffusion.samplers import make_sampler as named
    from sferd.methods.cld_teacher import EpsModel, to_state

    process = _checked_process(src)
    smp = src["sampler"]
    sampler = (named("gddim_cld", process=process, order=smp["order"]) if smp["kind"] == "gddim"
               else named("euler_cld", process=process))
    model = EpsModel(net, process=process, mixed=src["mixed_score"])

    def sample(noise, seeds, y):
        return sampler(model, to_state(noise), num_steps, y=y)

    return sample


def extra_metrics(params: dict) -> dict:
    src = params["source"]
    return {"sampler": src["sampler"], "cld_process": src["process"], "mixed_score": src["mixed_score"]}


def run(name: str, params: dict) -> None:
    fid.run(name, params, make_sampler=make_sampler, extra_metrics=extra_metrics)
