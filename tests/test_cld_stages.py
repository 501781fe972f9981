"""gDDIM on CLD as a method of the suite: the graph of a `cld` spec, the `cld_teacher` stage end to end (resumable,
1 vs 2 gloo processes) and the `fid_cld` stage end to end, all on tests/specs/tiny-cld.yaml's stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sferd.pipeline.graph import build_graph
from sferd.spec import load_spec
from sferd.util.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests/specs/tiny-cld.yaml"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 2e-5  # tests/test_ddp.py's tolerance: weights after a few Adam updates, 1 vs 2 processes
ROWS = ["cld-q0", "cld-q1", "cld-q2", "cld-q3", "cld-euler"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _stages(spec=None):
    spec = spec or load_spec(SPEC)
    return {st.name: st for st in build_graph(spec, spec_path="tests/specs/tiny-cld.yaml")}


def test_five_rows_share_one_cld_teacher_stage():
    stages = _stages()
    teachers = [st for st in stages.values() if st.kind == "cld_teacher"]
    assert [st.name for st in teachers] == ["digits-cld-teacher"]
    t = teachers[0]
    assert t.deps == ("results/digits-data",) and t.outs == ("results/digits-cld-teacher",)
    assert t.params["model"]["in_channels"] == t.params["model"]["out_channels"] == 2  # (x, v) of 1-channel digits
    assert t.params["process"] == {"m_inv": 4.0, "beta": 4.0, "gamma": 0.04, "t_min": 1e-3}
    assert t.params["mixed_score"] is True  # CLD's mixed score, the default
    assert t.params["training"] == {"updates": 12, "batch_size": 16, "lr": 1e-3, "warmup_updates": 2,
                                    "ema_decay": 0.9, "grad_clip_norm": 1.0, "checkpoint_every_updates": 5}
    assert t.params["outputs"]["train_log"] == "results/metrics/digits-cld-teacher-train.tsv"  # a training kind
    fids = sorted(n for n, st in stages.items() if st.kind == "fid_cld")
    assert fids == sorted(f"digits-{r}-s{k:04d}-fid" for r in ROWS for k in (4, 8))
    for n in fids:
        st = stages[n]
        assert "results/digits-cld-teacher" in st.deps and "results/digits-reference-stats" in st.deps
        src = st.params["source"]
        assert src["checkpoint"] == "results/digits-cld-teacher/model.pt" and src["model"] == t.params["model"]
        assert src["process"] == t.params["process"] and st.params["steps"] == st.cost["forward_passes"] / 64
        assert src["mixed_score"] is True
    assert stages["digits-cld-q3-s0004-fid"].params["source"]["sampler"] == {"kind": "gddim", "order": 3}
    assert stages["digits-cld-euler-s0008-fid"].params["source"]["sampler"] == {"kind": "euler"}
    # the VP teacher of the base spec stays in the graph, but no CLD row reads it
    assert "digits-teacher" in stages and not any("results/digits-teacher" in st.deps for st in stages.values()
                                                  if st.kind == "fid_cld")
    render = next(st for st in stages.values() if st.kind == "render")
    assert [r["row"] for r in render.params["rows"]] == [r for r in ROWS for _ in (4, 8)]


def test_row_granularity_groups_each_rows_fid_stages():
    from sferd.spec.models import Spec

    spec = load_spec(SPEC)
    stages = _stages(Spec.model_validate({**spec.model_dump(), "stage_granularity": "row"}))
    assert stages["digits-cld-q2-s0004-fid"].group == stages["digits-cld-q2-s0008-fid"].group == "digits-cld-q2-fid"
    assert stages["digits-cld-teacher"].group is None


def test_two_teacher_names_give_two_stages():
    from sferd.spec.models import Spec

    spec = load_spec(SPEC)
    doc = spec.model_dump()
    doc["methods"][4]["teacher"] = {**doc["methods"][4]["teacher"], "name": "cld-long", "updates": 24}
    stages = _stages(Spec.model_validate(doc))
    assert sorted(st.name for st in stages.values() if st.kind == "cld_teacher") == ["digits-cld-long-teacher",
                                                                                   "digits-cld-teacher"]
    assert stages["digits-cld-euler-s0004-fid"].params["source"]["checkpoint"] == "results/digits-cld-long-teacher/model.pt"


# ------------------------------------------------------------------------------------------- running the stages


def _params(updates: int | None = None, every: int | None = None) -> dict:
    """tiny-cld's resolved params of the stages the CLD rows need, the feature network shortened."""
    out = {}
    for name, st in _stages().items():
        p = json.loads(json.dumps(st.params))
        if st.kind == "features":
            p["network"]["updates"] = 5
        if st.kind == "cld_teacher":
            if updates is not None:
                p["training"]["updates"] = updates
            if every is not None:
                p["training"]["checkpoint_every_updates"] = every
        out[name] = p
    return out


def _run_in(d: Path, name: str, params: dict) -> None:
    """One stage in this process, as the runner runs it (sferd/pipeline/run.py), inside workspace `d`."""
    from sferd.pipeline.run import _run_stage

    cwd = os.getcwd()
    os.chdir(d)
    try:
        _run_stage(name, json.loads(json.dumps(params)))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with data, features, reference statistics and the tiny CLD teacher."""
    d = tmp_path_factory.mktemp("cld")
    params = _params()
    for name in ("digits-data", "digits-features", "digits-reference-stats", "digits-cld-teacher"):
        _run_in(d, name, params[name])
    (d / "params.json").write_text(json.dumps(params))
    return d, params


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "results/digits-cld-teacher/model.pt", weights_only=True)["state_dict"]


def test_cld_teacher_stage_writes_an_ema_2c_channel_unet(ws):
    d, params = ws
    ckpt = torch.load(d / "results/digits-cld-teacher/model.pt", weights_only=True)
    assert ckpt["weights"] == "ema" and ckpt["config"]["kind"] == "cld_teacher"
    sd = ckpt["state_dict"]
    assert sd["input_conv.weight"].shape[1] == 2 and sd["out.2.weight"].shape[0] == 2  # (x, v) in, ε of (x, v) out
    m = json.loads((d / "results/metrics/digits-cld-teacher.json").read_text())
    assert m["updates"] == 12 and np.isfinite(m["loss_mean_recent"]) and m["machine"]["world_size"] == 1
    log = (d / "results/metrics/digits-cld-teacher-train.tsv").read_text().splitlines()
    assert log[0].startswith("update\tloss") and len(log) == 13
    assert sorted(p.name for p in (d / "results/digits-cld-teacher").iterdir()) == ["config.json", "model.pt"]


class Killed(Exception):
    pass


def test_cld_teacher_stage_resumes_bitwise(ws, tmp_path, monkeypatch, capsys):
    """Killed after update 7 (states at 5), resumed: the same weights as the uninterrupted run of the fixture."""
    import sferd.methods.cld_teacher as method

    d, params = ws
    # Bitwise resume is checked at one intra-op thread, as tests/test_kill_resume.py runs it (OMP_NUM_THREADS=1):
    # with 2 threads a resumed CLD teacher was seen to differ from an uninterrupted one in the last bits (two
    # uninterrupted runs agree), so the reference is trained here at the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_bitwise(d, params, tmp_path, monkeypatch, capsys, method)
    finally:
        torch.set_num_threads(threads)


def _resume_bitwise(d, params, tmp_path, monkeypatch, capsys, method):
    ref = tmp_path / "ref"
    (ref / "results").mkdir(parents=True)
    os.symlink(d / "results/digits-data", ref / "results/digits-data")
    _run_in(ref, "digits-cld-teacher", params["digits-cld-teacher"])
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    os.symlink(d / "results/digits-data", run / "results/digits-data")
    real, calls = method.cld_teacher_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 7:
            raise Killed()
        return real(*a, **k)

    monkeypatch.setattr(method, "cld_teacher_loss", dying)
    with pytest.raises(Killed):
        _run_in(run, "digits-cld-teacher", params["digits-cld-teacher"])
    assert not (run / "results/digits-cld-teacher").exists()
    monkeypatch.setattr(method, "cld_teacher_loss", real)
    _run_in(run, "digits-cld-teacher", params["digits-cld-teacher"])
    assert "resuming at update 5/12" in capsys.readouterr().err
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_and_two_gloo_processes_train_the_same_cld_teacher(ws, tmp_path):
    d, params = ws
    two = tmp_path / "two"
    (two / "results").mkdir(parents=True)
    os.symlink(d / "results/digits-data", two / "results/digits-data")
    (two / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SFERD_MICRO_BATCH", None)
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "sferd.pipeline.run",
                        "--params", "params.json", "digits-cld-teacher"], cwd=two, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, other = _weights(d), _weights(two)
    worst = max(float((one[k] - other[k]).abs().max()) for k in one)
    assert worst <= TOL, f"1 vs 2 processes differ by {worst:.3g} (tolerance {TOL})"
    init = __import__("sferd.nn.build", fromlist=["build_unet"]).build_unet(params["digits-cld-teacher"]["model"])
    moved = max(float((one[k] - v).abs().max()) for k, v in init.state_dict().items() if k in one)
    assert moved > 100 * TOL  # the comparison is not vacuous: the weights trained
    m = json.loads((two / "results/metrics/digits-cld-teacher.json").read_text())
    assert m["machine"]["world_size"] == 2


@pytest.mark.parametrize("row", ["cld-q3", "cld-euler"])
def test_fid_cld_samples_and_measures(ws, row):
    d, params = ws
    name = f"digits-{row}-s0004-fid"
    _run_in(d, name, params[name])
    m = json.loads((d / f"results/metrics/{name}.json").read_text())
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["nfe"] == 4 and m["steps"] == 4
    assert m["sampler"] == params[name]["source"]["sampler"] and m["cld_process"]["m_inv"] == 4.0
    assert m["mixed_score"] is True
    assert m["num_samples"] == 64 and m["seeds"] == "0-63" and m["row"] == row
    with np.load(d / f"results/{name}/samples.npz") as z:
        assert z["images"].shape == (64, 8, 8, 1) and z["images"].dtype == np.uint8
        assert list(z["seeds"]) == list(range(64))


def test_fid_cld_sampling_is_independent_of_the_batch_size(ws, tmp_path):
    """Per-sample seeds: the q=2 samples at 4 NFE are the same bytes with batches of 64 and of 7."""
    d, params = ws
    name = "digits-cld-q2-s0004-fid"
    a = dict(params[name])
    _run_in(d, name, a)
    b = json.loads(json.dumps(a))
    b["sample_batch_size"] = 7
    b["outputs"] = {"dir": "results/q2-batch7", "metrics": "results/metrics/q2-batch7.json"}
    _run_in(d, name, b)
    with np.load(d / f"results/{name}/samples.npz") as x, np.load(d / "results/q2-batch7/samples.npz") as y:
        assert np.array_equal(x["images"], y["images"])


def test_fid_cld_refuses_a_vp_checkpoint_and_other_constants_before_sampling(ws):
    d, params = ws
    _run_in(d, "digits-teacher-vp", {**params["digits-teacher"], "training": {**params["digits-teacher"]["training"],
                                                                              "updates": 1}})
    vp = json.loads(json.dumps(params["digits-cld-q0-s0004-fid"]))
    vp["source"]["checkpoint"] = "results/digits-teacher/model.pt"
    vp["source"]["model"] = params["digits-teacher"]["model"]
    vp["outputs"] = {"dir": "results/vp-as-cld", "metrics": "results/metrics/vp-as-cld.json"}
    with pytest.raises(StageError, match="not a CLD teacher"):
        _run_in(d, "vp-as-cld", vp)
    other = json.loads(json.dumps(params["digits-cld-q0-s0004-fid"]))
    other["source"]["process"]["beta"] = 2.0
    other["outputs"] = {"dir": "results/other-beta", "metrics": "results/metrics/other-beta.json"}
    with pytest.raises(StageError, match="CLD constants"):
        _run_in(d, "other-beta", other)
    unmixed = json.loads(json.dumps(params["digits-cld-q0-s0004-fid"]))
    unmixed["source"]["mixed_score"] = False
    unmixed["outputs"] = {"dir": "results/unmixed", "metrics": "results/metrics/unmixed.json"}
    with pytest.raises(StageError, match="mixed_score"):
        _run_in(d, "unmixed", unmixed)
    assert not (d / "results/metrics/vp-as-cld.json").exists() and not (d / "results/metrics/other-beta.json").exists()


def test_a_rows_own_steps_choose_its_fid_stages():
    from sferd.spec.models import Spec

    doc = load_spec(SPEC).model_dump()
    doc["methods"][3]["steps"] = [4, 16]
    stages = _stages(Spec.model_validate(doc))
    assert sorted(n for n in stages if n.startswith("digits-cld-q3-")) == ["digits-cld-q3-s0004-fid",
                                                                           "digits-cld-q3-s0016-fid"]
    assert stages["digits-cld-q3-s0016-fid"].params["steps"] == 16
    assert "digits-cld-q2-s0016-fid" not in stages  # the other rows keep evaluation.student_steps


def test_fid_cld_samples_are_the_same_bytes_on_two_gloo_processes(ws, tmp_path):
    """Sharded sampling (each rank its batches, rank 0 gathers): samples.npz equals the one-process file."""
    d, params = ws
    name = "digits-cld-q1-s0004-fid"
    _run_in(d, name, params[name])
    two = tmp_path / "two"
    (two / "results").mkdir(parents=True)
    for sub in ("digits-data", "digits-features", "digits-reference-stats", "digits-cld-teacher"):
        os.symlink(d / "results" / sub, two / "results" / sub)
    p = json.loads(json.dumps(params[name]))
    p["sample_batch_size"] = 24  # 64 samples: 3 batches over 2 ranks, so the ranks' shares differ
    (two / "params.json").write_text(json.dumps({name: p}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "sferd.pipeline.run",
                        "--params", "params.json", name], cwd=two, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(d / f"results/{name}/samples.npz") as a, np.load(two / f"results/{name}/samples.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("images", "labels", "seeds"))
    assert json.loads((two / f"results/metrics/{name}.json").read_text())["machine"]["world_size"] == 2
