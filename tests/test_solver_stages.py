"""`kind: solver` stages run for real: the D-ODE calibration stage and the FID stage of a named sampler.

A tiny randomly initialised U-Net in the suite's checkpoint format stands in for the teacher. Checked: the stage's
λ's are the library's fit on the stage's calibration batch (drawn from its own noise stream); on that batch the
first corrected step is never further from the teacher than the base step (the least-squares property, measured
by the stage itself); λ's and metrics are bit-identical when torchrun runs the stage on 2 processes (gloo); the
FID stage with `ddim` (or D-DDIM with all-zero λ's) draws exactly the samples of the plain FID stage's DDIM; a λ
file that does not fit its FID stage stops it before sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_shard import MODEL, _checkpoint, _launcher, _stage_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

TEACHER = "results/teacher/model.pt"


def _calibration(out: str, *, steps=2, factor=3, base=None, teacher=None, batch=7, chunk=3) -> dict:
    return {
        "kind": "dode_calibration", "student_steps": steps,
        "sampler": base or {"base": "ddim"}, "teacher_solver": teacher or {"base": "ddim"},
        "teacher_steps": factor * steps, "factor": factor, "clip": True, "batch_size": batch, "seed": 11,
        "chunk_size": chunk,
        "teacher": {"checkpoint": TEACHER, "model": MODEL, "parameterization": "x"},
        "outputs": {"dir": f"results/{out}", "lambdas": f"results/{out}/lambdas.json",
                    "metrics": f"results/metrics/{out}.json"},
    }


def _workspace(d: Path, stages: dict) -> None:
    _checkpoint(d / TEACHER)
    (d / "params.json").write_text(json.dumps(stages))


def _lambdas(d: Path, out: str) -> dict:
    return json.loads((d / f"results/{out}/lambdas.json").read_text())


def test_calibration_stage_fits_the_library_lambdas_on_its_own_batch(tmp_path, monkeypatch):
    from sferd.diffusion import dode
    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.pipeline.run import main
    from sferd.pipeline.stages.common import load_model
    from sferd.pipeline.stages.dode_calibration import CALIBRATION_STREAM, calibration_labels, calibration_noise
    from sferd.diffusion.sampler import NOISE_STREAMS

    monkeypatch.chdir(tmp_path)
    _workspace(tmp_path, {"cal": _calibration("cal"),
                          "cal-g": _calibration("cal-g", steps=3, base={"base": "gddim", "order": 2})})
    assert main(["cal"]) == 0 and main(["cal-g"]) == 0
    assert CALIBRATION_STREAM not in NOISE_STREAMS.values()  # never an FID sample's noise
    rec = _lambdas(tmp_path, "cal")
    assert rec["student_steps"] == 2 and rec["factor"] == 3 and rec["seeds"] == "11-17" and len(rec["lambdas"]) == 2
    # the library's fit, in one chunk, on the batch the stage says it used: the same λ's to float64 rounding
    seeds = np.arange(11, 18)
    noise = calibration_noise(seeds, (1, 8, 8))
    y = torch.from_numpy(calibration_labels(seeds, 3))
    denoise = NetworkDenoiser(load_model(TEACHER, MODEL), "x")
    ref = dode.calibrate(dode.DDIMBase(), denoise, noise, 2, factor=3, y=y)
    np.testing.assert_allclose(rec["lambdas"], ref.lambdas, rtol=1e-6, atol=1e-9)
    assert any(abs(v) > 1e-6 for v in rec["lambdas"])
    for out, steps in (("cal", 2), ("cal-g", 3)):
        m = json.loads((tmp_path / f"results/metrics/{out}.json").read_text())
        # λ_1 minimises the batch's squared distance to the teacher after the first step, so it never loses there
        assert m["mse_corrected_1"] <= m["mse_base_1"] * (1 + 1e-9), m
        assert [m[f"lambda_{i}"] for i in range(1, steps + 1)] == _lambdas(tmp_path, out)["lambdas"]
        assert m["final_mse_base"] == m[f"mse_base_{steps}"] and m["machine"]["world_size"] == 1
    assert _lambdas(tmp_path, "cal-g")["sampler"] == {"base": "gddim", "order": 2}


def test_calibration_lambdas_are_identical_for_1_and_2_processes(tmp_path, monkeypatch):
    """3 chunks of 7 calibration images over 2 ranks (1 + 2 chunks): the λ file and metrics of the 2-process run
    equal the 1-process run's, bit for bit (machine record aside)."""
    from sferd.pipeline.run import main

    monkeypatch.chdir(tmp_path)
    _workspace(tmp_path, {s: _calibration(s, steps=3, base={"base": "gddim", "order": 1}) for s in ("one", "two")})
    assert main(["one"]) == 0
    # the stage's DVC command, the launcher, set to 2 processes: it starts torchrun (gloo) for a shardable kind
    r = _launcher(tmp_path, "two", SFERD_NPROC_PER_NODE="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("two: λ =") == 1, r.stdout  # rank 0 alone wrote and reported
    a, b = _lambdas(tmp_path, "one"), _lambdas(tmp_path, "two")
    assert a.pop("stage") == "one" and b.pop("stage") == "two"
    assert a == b and a["numerators"] != [0.0] * 3
    m1, m2 = (json.loads((tmp_path / f"results/metrics/{s}.json").read_text()) for s in ("one", "two"))
    assert (m1.pop("machine")["world_size"], m2.pop("machine")["world_size"]) == (1, 2)
    m1.pop("stage"), m2.pop("stage")
    assert m1 == m2


def _fid(common: dict, out: str, source: dict, steps: int = 2) -> dict:
    return {"kind": "fid" if source["kind"] == "model" else "fid_solver", "row": out, "steps": steps,
            **common, "source": source, "num_samples": 6, "sample_seed_start": 100, "sample_batch_size": 4,
            "image_shape": [1, 8, 8], "outputs": {"dir": f"results/{out}", "metrics": f"results/metrics/{out}.json"}}


def _solver(name: str, **extra) -> dict:
    return {"kind": "solver", "checkpoint": TEACHER, "model": MODEL, "parameterization": "x",
            "sampler": {"name": name, "clip": True, **extra.pop("sampler", {})}, **extra}


def test_fid_solver_stages_sample_with_the_named_sampler(tmp_path, monkeypatch):
    from sferd.pipeline.run import main

    monkeypatch.chdir(tmp_path)
    common = _stage_inputs(tmp_path)
    _checkpoint(tmp_path / TEACHER)
    stages = json.loads((tmp_path / "params.json").read_text())
    cal = _calibration("cal")
    zero = tmp_path / "results/zero/lambdas.json"
    stages.update({
        "cal": cal,
        "plain": _fid(common, "plain", {"kind": "model", "checkpoint": TEACHER, "model": MODEL, "parameterization": "x"}),
        "ddim": _fid(common, "ddim", _solver("ddim")),
        "euler": _fid(common, "euler", _solver("euler_pf")),
        "gddim": _fid(common, "gddim", _solver("gddim", sampler={"order": 1})),
        "d-ddim": _fid(common, "d-ddim", _solver("d_ddim", lambdas=cal["outputs"]["lambdas"])),
        "d-zero": _fid(common, "d-zero", _solver("d_ddim", lambdas=str(zero.relative_to(tmp_path)))),
        "d-stale": _fid(common, "d-stale", _solver("d_ddim", lambdas=cal["outputs"]["lambdas"]), steps=4),
    })
    (tmp_path / "params.json").write_text(json.dumps(stages))
    for s in ("cal", "plain", "ddim", "euler", "gddim", "d-ddim"):
        assert main([s]) == 0, s
    zero.parent.mkdir(parents=True)
    zero.write_text(json.dumps({**_lambdas(tmp_path, "cal"), "lambdas": [0.0, 0.0]}))
    assert main(["d-zero"]) == 0

    images = {s: np.load(tmp_path / f"results/{s}/samples.npz")["images"]
              for s in ("plain", "ddim", "euler", "gddim", "d-ddim", "d-zero")}
    # the `ddim` sampler of the family, and D-DDIM with λ = 0, are the plain FID stage's DDIM, byte for byte
    assert images["ddim"].tobytes() == images["plain"].tobytes()
    assert images["d-zero"].tobytes() == images["plain"].tobytes()
    for s in ("euler", "gddim", "d-ddim"):  # other samplers: other images from the same noise
        assert images[s].tobytes() != images["plain"].tobytes(), s
    m = json.loads((tmp_path / "results/metrics/d-ddim.json").read_text())
    assert m["sampler"] == "d_ddim" and m["dode_lambdas"] == _lambdas(tmp_path, "cal")["lambdas"] and m["nfe"] == 2
    g = json.loads((tmp_path / "results/metrics/gddim.json").read_text())
    assert g["sampler"] == "gddim" and g["sampler_order"] == 1 and np.isfinite(g["fid"])

    # λ's fitted for 2 steps do not serve a 4-step stage: one error line, before any sampling
    assert main(["d-stale"]) == 1
    assert not (tmp_path / "results/d-stale").exists()
