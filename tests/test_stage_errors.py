"""Stage runner failures a user can fix end as one line naming the cause and the fix (exit 1)."""

import json
import subprocess
import sys

import torch

from sferd.nn.build import build_unet
from sferd.pipeline.run import main

MODEL = {
    "in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None, "dropout": 0.0,
    "num_classes": None, "norm_groups": 4,
}


def _params(tmp_path, stages):
    p = tmp_path / "params.json"
    p.write_text(json.dumps(stages))
    return str(p)


def _distill_params(ckpt, teacher_model):
    return {
        "kind": "distill", "guidance": None, "seed": 0,
        "dataset": {"id": "digits-8x8", "heldout_fraction": 0.2, "split_seed": 0, "random_flip": False},
        "student_steps": 2,
        "teacher": {"checkpoint": ckpt, "model": teacher_model, "is_original_teacher": True},
        "model": MODEL, "parameterization": "x", "loss_weighting": "truncated_snr",
        "training": {"updates": 2, "batch_size": 4, "lr": 1e-4, "grad_clip_norm": 1.0, "checkpoint_every_updates": 1},
        "inputs": {"train": "results/digits-data/train"},
        "outputs": {"dir": "results/x-pd-s0002", "metrics": "results/metrics/x-pd-s0002.json"},
    }


def _data(tmp_path):
    import numpy as np

    from fakes import write_split_arrays

    write_split_arrays(tmp_path / "results/digits-data/train", np.zeros((8, 8, 8, 1), np.uint8))


def test_missing_upstream_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    params = _params(tmp_path, {"x-pd-s0002": _distill_params("results/digits-teacher/model.pt", MODEL)})
    assert main(["--params", params, "x-pd-s0002"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "results/digits-teacher/model.pt is missing" in err[0] and "dvc repro digits-teacher" in err[0]
    assert not (tmp_path / "results/x-pd-s0002/model.pt").exists()


def test_checkpoint_from_other_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    other = {**MODEL, "base_channels": 16}
    ckpt = tmp_path / "results/digits-teacher/model.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": build_unet(other).state_dict(), "config": {"model": other}}, ckpt)
    params = _params(tmp_path, {"x-pd-s0002": _distill_params("results/digits-teacher/model.pt", MODEL)})
    assert main(["--params", params, "x-pd-s0002"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model config" in err[0] and "base_channels" in err[0]
    assert "dvc repro digits-teacher" in err[0]


def test_distill_runs_and_writes_outputs(tmp_path, monkeypatch):
    """The same params with a matching checkpoint succeed (so the two failures above are specific)."""
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    ckpt = tmp_path / "results/digits-teacher/model.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": build_unet(MODEL).state_dict(), "config": {"model": MODEL}}, ckpt)
    params = _params(tmp_path, {"x-pd-s0002": _distill_params("results/digits-teacher/model.pt", MODEL)})
    assert main(["--params", params, "x-pd-s0002"]) == 0
    saved = torch.load(tmp_path / "results/x-pd-s0002/model.pt", weights_only=True)
    assert saved["config"]["model"] == MODEL and saved["config"]["student_steps"] == 2
    assert (tmp_path / "results/metrics/x-pd-s0002.json").is_file()
    # the runner stamps the code fingerprint into the config (and so into the resume key); a finished stage
    # leaves neither scratch state nor stray files among its outputs
    assert len(saved["config"]["code_sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "results/x-pd-s0002").iterdir()) == ["config.json", "model.pt"]
    assert [p.name for p in (tmp_path / ".sferd/scratch/x-pd-s0002").iterdir()] == ["lock"]


def test_unknown_stage_and_missing_params(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["nothing"]) == 1
    assert "params.json not found" in capsys.readouterr().err
    params = _params(tmp_path, {"a": {"kind": "data"}})
    assert main(["--params", params, "b"]) == 1
    assert "has no section" in capsys.readouterr().err


def test_runner_usage_error_exits_2():
    r = subprocess.run([sys.executable, "-m", "sferd.pipeline.run"], capture_output=True, text=True)
    assert r.returncode == 2


def test_unshardable_stage_refuses_several_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = _params(tmp_path, {"x-data": {"kind": "data", "dataset": {"id": "digits-8x8"}, "outputs": {"dir": "r"}}})
    assert main(["--params", params, "x-data"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs in one process, but WORLD_SIZE=2" in err[0]
    assert not (tmp_path / "r").exists()
