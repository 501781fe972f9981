"""A teacher from an external checkpoint: hash checked first, architecture checked strictly, then the ordinary
teacher model.pt that the chains load; spec side: `kind: external` compiles to an import stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sferd.nn.build import build_unet
from sferd.pipeline.run import main
from sferd.pipeline.stages.common import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None, "dropout": 0.0,
    "num_classes": None, "norm_groups": 4,
}


def _ckpt(tmp_path, model=MODEL, wrap=True) -> tuple[Path, str, dict]:
    torch.manual_seed(0)
    net = build_unet(model)
    state = {k: v + 0.01 for k, v in net.state_dict().items()}
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": state, "config": {"model": model}} if wrap else state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def _params(tmp_path, path, sha):
    p = {"x-teacher": {"kind": "teacher_import", "model": MODEL, "parameterization": "x",
                       "source": {"path": str(path), "sha256": sha},
                       "outputs": {"dir": str(tmp_path / "out"), "metrics": str(tmp_path / "m.json")}}}
    (tmp_path / "params.json").write_text(json.dumps(p))
    return str(tmp_path / "params.json")


@pytest.mark.parametrize("wrap", [True, False], ids=["suite-model-pt", "bare-state-dict"])
def test_import_writes_the_teacher_model_pt(tmp_path, wrap):
    path, sha, state = _ckpt(tmp_path, wrap=wrap)
    assert main(["--params", _params(tmp_path, path, sha), "x-teacher"]) == 0
    net = load_model(str(tmp_path / "out/model.pt"), MODEL)  # what the first halving does
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert json.loads((tmp_path / "m.json").read_text())["sha256"] == sha


def test_hash_mismatch_stops_before_loading_and_writes_nothing(tmp_path, capsys):
    path, sha, _ = _ckpt(tmp_path)
    assert main(["--params", _params(tmp_path, path, "0" * 64), "x-teacher"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"has sha256 {sha}, the spec expects {'0' * 64}" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_missing_file_and_wrong_architecture(tmp_path, capsys):
    assert main(["--params", _params(tmp_path, tmp_path / "absent.pt", "0" * 64), "x-teacher"]) == 1
    assert "not found" in capsys.readouterr().err
    other = dict(MODEL, base_channels=16)
    path, sha, _ = _ckpt(tmp_path, model=other)
    assert main(["--params", _params(tmp_path, path, sha), "x-teacher"]) == 1
    assert "does not fit the spec's teacher U-Net" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _spec_with_teacher(tmp_path, block: str) -> Path:
    src = (ROOT / "tests/specs/tiny.yaml").read_text()
    start, end = src.index("teacher:\n"), src.index("methods:\n")
    f = tmp_path / "s.yaml"
    f.write_text(src[:start] + block + src[end:])
    return f


EXTERNAL = """teacher:
  kind: external
  path: checkpoints/teacher.pt
  sha256: {sha}
  model:
    base_channels: 8
    channel_mult: [1, 2]
    num_res_blocks: 1
    attention_resolutions: [4]
    norm_groups: 4
"""


def test_external_teacher_spec_compiles_to_an_import_stage(tmp_path):
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    f = _spec_with_teacher(tmp_path, EXTERNAL.format(sha="AB" * 32))
    stages = {s.name: s for s in build_graph(load_spec(f), spec_path="s.yaml")}
    imp = stages["digits-teacher"]
    assert imp.kind == "teacher_import" and imp.params["source"] == {"path": "checkpoints/teacher.pt", "sha256": "ab" * 32}
    assert stages["digits-pd-s0002"].params["teacher"]["checkpoint"] == "results/digits-teacher/model.pt"


def test_bad_hash_in_spec_is_located(tmp_path):
    from sferd.spec import load_spec
    from sferd.spec.loader import SpecError

    f = _spec_with_teacher(tmp_path, EXTERNAL.format(sha="abc"))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    line = f.read_text().splitlines().index("  sha256: abc") + 1
    assert any(i.format().startswith(f"{f}:{line}:11: error: teacher.sha256:") and "64 hexadecimal" in i.format()
               for i in e.value.issues)
