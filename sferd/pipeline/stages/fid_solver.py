"""Stage `fid_solver`: FID of the spec's teacher sampled by a named sampler of the family (sferd.diffusion.samplers:
ddim, euler_pf, gddim, and D-ODE's d_ddim / d_gddim with the λ's their calibration stage wrote).

Everything but the sampler is `fid.run`'s: per-sample seeds, sharding, the samples file and the metrics record,
which adds the sampler's name and order (and, for D-ODE, the λ's and their file). A solver source is a model source
with another sampler, so `fid.run` sees it as one (its own list of source kinds, and with it the code fingerprint of
every existing FID stage, stays as it is).
"""

from __future__ import annotations

import math

from sferd.util.artifacts import read_json
from sferd.util.errors import StageError
from sferd.pipeline.stages import fid

DODE = ("d_ddim", "d_gddim")


def _lambdas(src: dict, steps: int) -> list[float]:
    """The fitted λ's for this sampler and step count, checked against what the FID stage samples with."""
    from pathlib import Path

    path = src["lambdas"]
    if not Path(path).is_file():
        raise StageError(f"no D-ODE λ file {path}: run its calibration stage (`dvc repro {Path(path).parent.name}`)")
    try:
        rec = read_json(path)
    except ValueError as e:
        raise StageError(f"{path} is not valid JSON ({e}); re-run its calibration stage") from None
    s = src["sampler"]
    want = {"base": s["name"][2:], **({"order": s["order"]} if "order" in s else {})}
    problems = []
    if rec.get("sampler") != want:
        problems.append(f"it was fitted for {rec.get('sampler')}, this stage samples with {want}")
    if rec.get("student_steps") != steps:
        problems.append(f"it holds λ's for {rec.get('student_steps')} steps, this stage takes {steps}")
    if rec.get("clip") != s["clip"]:
        problems.append("it was fitted with other x̂₀ clipping")
    if rec.get("teacher_checkpoint") != src["checkpoint"]:
        problems.append(f"it was fitted on {rec.get('teacher_checkpoint')}, this stage samples {src['checkpoint']}")
    lambdas = rec.get("lambdas")
    if not isinstance(lambdas, list) or len(lambdas) != steps or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lambdas):
        problems.append(f"its `lambdas` is not a list of {steps} finite numbers")
    if problems:
        raise StageError(f"{path} does not fit this stage: {'; '.join(problems)}; re-run its calibration stage")
    return [float(v) for v in lambdas]


def sampler_options(src: dict, steps: int) -> dict:
    s = src["sampler"]
    opts = {"clip": s["clip"], **({"order": s["order"]} if "order" in s else {})}
    if s["name"] in DODE:
        opts["lambdas"] = _lambdas(src, steps)
    return opts


def make_sampler(src: dict, net, steps: int):
    """`sample(noise, seeds, y)` with the named sampler on the teacher's denoiser."""
    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.diffusion.samplers import make_sampler as named_sampler

    sampler = named_sampler(src["sampler"]["name"], **sampler_options(src, steps))
    denoiser = NetworkDenoiser(net, src["parameterization"])

    def sample(noise, seeds, y):
        return sampler(denoiser, noise, steps, y=y)

    return sample


def extra_metrics(params: dict) -> dict:
    src, s = params["source"], params["source"]["sampler"]
    out = {"sampler": s["name"], **({"sampler_order": s["order"]} if "order" in s else {})}
    if s["name"] in DODE:
        out["dode_lambdas"] = _lambdas(src, params["steps"])
        out["dode_lambdas_file"] = src["lambdas"]
    return out


def run(name: str, params: dict) -> None:
    src = params["source"]
    if src.get("kind") != "solver":
        raise StageError(f"a fid_solver stage samples a `solver` source, got {src.get('kind')!r}; recompile")
    sampler_options(src, params["steps"])  # before any sampling: a stale or foreign λ file stops here
    fid.run(name, {**params, "source": {**src, "kind": "model"}}, make_sampler=make_sampler,
            extra_metrics=lambda p: extra_metrics({**p, "source": src}))
