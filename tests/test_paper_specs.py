"""The paper specs: the reported numbers are exactly the ones with a verified source (baselines.md §7), every
other cell is null with its reason, the settings are PD's configs and D9/D12/D13, and the pipelines live in
their own folders (plain `dvc repro` never reaches them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from sferd.pipeline.graph import build_graph, encoder_config
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

# (system, source must contain, {steps: value}) — None means "not transcribed"
REPORTED = {
    "table1": [
        ("PD (Salimans & Ho)", "Salimans & Ho, ICLR 2022, Table 2", {1: 9.12, 2: 4.51, 4: 3.00, 8: 2.57}),
        ("PD (re-run by Song et al.)", "Consistency Models, ICML 2023, Table 1", {1: 8.34, 2: 5.58, 4: None, 8: None}),
        ("CD (LPIPS)", "Consistency Models, ICML 2023, Table 1", {1: 3.55, 2: 2.93, 4: None, 8: None}),
        ("SFERD", "AAAI 2024, abstract", {1: 5.31, 2: None, 4: None, 8: None}),
    ],
    "table2": [
        ("PD (re-run by Song et al.)", "Consistency Models, ICML 2023, Table 2", {1: 15.39, 2: 8.95, 4: None, 8: None}),
        ("CD (LPIPS)", "Consistency Models, ICML 2023, Table 2", {1: 6.20, 2: 4.70, 4: None, 8: None}),
        ("SFERD", "AAAI 2024, abstract", {1: 9.39, 2: None, 4: None, 8: None}),
    ],
}


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_reported_numbers_are_exactly_the_verified_ones(name):
    spec = load_spec(ROOT / f"specs/{name}.yaml")
    got = [(r.system, r.source, dict(r.values)) for r in spec.reported]
    assert [(s, v) for s, _, v in got] == [(s, v) for s, _, v in REPORTED[name]]
    for (_, source, values), (_, must, _) in zip(got, REPORTED[name]):
        assert must in source
    for r in spec.reported:
        if any(v is None for v in r.values.values()):
            assert r.reason == "not transcribed"


def test_table1_is_pd_cifar10_with_the_papers_best_sferd_knobs():
    spec = load_spec(ROOT / "specs/table1.yaml")
    assert spec.dataset.id == "cifar10-32x32" and spec.dataset.random_flip and spec.pipeline == "stages/table1"
    m = spec.teacher.model
    assert (m.base_channels, m.channel_mult, m.num_res_blocks, m.attention_resolutions, m.dropout) == (256, [1, 1, 1], 3, [16, 8], 0.2)
    assert (spec.teacher.parameterization, spec.teacher.batch_size, spec.teacher.lr, spec.teacher.weight_decay) == ("x", 128, 2e-4, 0.001)
    pd, sferd = spec.methods
    assert (pd.start_steps, pd.end_steps, pd.updates_per_halving, pd.batch_size, pd.lr) == (8192, 1, 50000, 128, 5e-5)
    assert (sferd.start_steps, sferd.updates_per_halving, sferd.lr) == (8192, 50000, 5e-5)  # same chain as PD
    g = sferd.guidance
    assert (g.threshold, g.strength, g.blur_sigma, g.blur_kernel_size) == (1.0, 0.3, 3.0, 15)
    assert (g.attention_block.part, g.attention_block.resolution, g.attention_block.position) == ("decoder", 16, "last")
    enc = encoder_config(32, 3, sferd.predictor)
    assert enc["channels"] == [64, 128, 128] and enc["attention_after"] == 1 and enc["latent_dim"] == 512
    assert spec.evaluation.num_samples == 50000 and spec.evaluation.feature_extractor == "inception-v3-compat"


def test_table2_is_class_conditional_imagenet64_with_both_output():
    spec = load_spec(ROOT / "specs/table2.yaml")
    assert spec.dataset.id == "imagenet-64x64" and spec.teacher.model.class_conditional
    m = spec.teacher.model
    assert (m.base_channels, m.channel_mult, m.attention_resolutions, m.head_channels, m.dropout) == (192, [1, 2, 3, 4], [32, 16, 8], 64, 0.1)
    assert (spec.teacher.parameterization, spec.teacher.batch_size, spec.teacher.lr) == ("both", 2048, 3e-4)
    pd, sferd = spec.methods
    assert (pd.start_steps, pd.updates_per_halving, pd.batch_size, pd.lr) == (1024, 50000, 2048, 1e-4)
    ref = sferd.guidance.attention_block
    assert (ref.part, ref.resolution, ref.position) == ("decoder", 32, "first")
    assert encoder_config(64, 3, sferd.predictor)["channels"] == [64, 128, 128, 128]


@pytest.mark.parametrize("name, halvings", [("table1", 13), ("table2", 10)])
def test_paper_pipelines_are_separate_and_complete(name, halvings):
    spec = load_spec(ROOT / f"specs/{name}.yaml")
    names = [s.name for s in build_graph(spec, spec_path=f"specs/{name}.yaml")]
    short = spec.dataset.short
    assert len([n for n in names if n.startswith(f"{short}-pd-s") and n.count("-") == 2]) == halvings
    assert len([n for n in names if n.startswith(f"{short}-sferd-s") and n.count("-") == 2]) == halvings
    for k in (1, 2, 4, 8):
        for suffix in ("predictor", "prior", "fid"):
            assert f"{short}-sferd-s{k:04d}-{suffix}" in names
    committed = YAML(typ="safe").load((ROOT / f"stages/{name}/dvc.yaml").read_text())["stages"]
    assert list(committed) == names
    root = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not set(root) & set(committed)  # plain `dvc repro` (the root dvc.yaml) never reaches these


def test_local_inception_weights_reach_every_fid_stage(tmp_path):
    from sferd.spec.loader import SpecError

    src = (ROOT / "specs/table1.yaml").read_text()
    f = tmp_path / "t1.yaml"
    f.write_text(src.replace("  feature_extractor: inception-v3-compat\n",
                             "  feature_extractor: inception-v3-compat\n  feature_weights: weights/pt_inception.pth\n"))
    stages = build_graph(load_spec(f), spec_path="specs/table1.yaml")
    fids = [s for s in stages if s.kind in ("fid", "fid_sferd")]
    assert fids and all(s.params["feature_weights"] == "weights/pt_inception.pth" for s in fids)
    q = tmp_path / "q.yaml"
    text = (ROOT / "specs/quickstart.yaml").read_text().replace(
        "  feature_extractor: digits-cnn\n", "  feature_extractor: digits-cnn\n  feature_weights: x.pth\n")
    q.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(q)
    line = text.splitlines().index("  feature_weights: x.pth") + 1
    assert any(i.format().startswith(f"{q}:{line}:") and "only for inception-v3-compat" in i.format() for i in e.value.issues)


@pytest.mark.parametrize("dataset_id", ["cifar10-64x64", "mnist-28x28"])
def test_unknown_dataset_or_resolution_is_a_located_error_and_nothing_is_written(tmp_path, monkeypatch, dataset_id):
    """A resolution the dataset does not come in is an unknown dataset id (ids carry the resolution)."""
    import shutil

    from typer.testing import CliRunner

    from sferd.cli import app

    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "specs").mkdir()
    text = (ROOT / "specs/table1.yaml").read_text()
    assert "  id: cifar10-32x32\n" in text
    (tmp_path / "specs/table1.yaml").write_text(text.replace("  id: cifar10-32x32\n", f"  id: {dataset_id}\n"))
    monkeypatch.chdir(tmp_path)
    line = text.splitlines().index("  id: cifar10-32x32") + 1
    for args in (["validate", "specs/table1.yaml"], ["compile", "specs/table1.yaml"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, r.output
        assert r.stderr.startswith(f"specs/table1.yaml:{line}:7: error: dataset.id: Input should be 'digits-8x8'")
        assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sferd", "specs"]  # nothing compiled
    assert not (tmp_path / "specs/spec.schema.json").exists()
