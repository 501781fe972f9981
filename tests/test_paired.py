"""Paired differences over seeds (issue 11): the Student-t interval against values computed by hand and printed
t tables, pairing by seed (not by position), missing replicates, the located spec errors of `table.paired_against`,
the rendered section and CSV of specs/quickstart-seeds.yaml, and where its stages compile."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
from fakes import write_metrics
from ruamel.yaml import YAML

from sferd.pipeline.graph import build_graph
from sferd.report.paired import paired_difference, t_quantile
from sferd.report.table import render_markdown, table_context
from sferd.spec import load_spec
from sferd.spec.loader import SpecError

ROOT = Path(__file__).resolve().parents[1]
SEEDS_SPEC = "specs/quickstart-seeds.yaml"
# Student's t, two-sided 95 % (the 0.975 quantile), from printed tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2),
# not from the code under test
T975 = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451, 9: 2.2621572, 30: 2.0422725}


@pytest.mark.parametrize("df, expected", sorted(T975.items()))
def test_t_quantile_matches_printed_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-7)


def test_t_quantile_refuses_meaningless_arguments():
    for p, df in ((0.0, 4), (1.0, 4), (0.975, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_five_differences_by_hand_interval_excludes_zero():
    # d = 1, 2, 3, 4, 5: mean 3; s² = (4 + 1 + 0 + 1 + 4)/4 = 2.5; s/√5 = √0.5; half width = 2.7764451·√0.5 = 1.9632432
    base = {s: 10.0 for s in range(5)}
    method = {s: 10.0 + (s + 1) for s in range(5)}
    d = paired_difference(method, base)
    assert d.complete and d.n == 5
    assert d.differences == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert d.mean == pytest.approx(3.0) and d.std == pytest.approx(math.sqrt(2.5))
    assert d.t == pytest.approx(2.7764451, abs=5e-7)
    assert d.low == pytest.approx(3.0 - 1.9632432, abs=1e-6) and d.high == pytest.approx(3.0 + 1.9632432, abs=1e-6)
    assert d.excludes_zero is True


def test_five_differences_by_hand_interval_contains_zero():
    # d = 1, 2, −0.5, 2, 2: mean 1.3; squared deviations .09 .49 3.24 .49 .49 → s² = 4.8/4 = 1.2;
    # half width = 2.7764451·√(1.2/5) = 2.7764451·0.4898979 = 1.3601750 → [−0.0601750, 2.6601750]
    method = {0: 10.0, 1: 12.0, 2: 9.0, 3: 11.0, 4: 13.0}
    base = {0: 9.0, 1: 10.0, 2: 9.5, 3: 9.0, 4: 11.0}
    d = paired_difference(method, base)
    assert d.mean == pytest.approx(1.3)
    assert d.low == pytest.approx(-0.0601750, abs=1e-6) and d.high == pytest.approx(2.6601750, abs=1e-6)
    assert d.excludes_zero is False


def test_negative_interval_excludes_zero_and_equal_differences_give_a_point():
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.5, 2: 3.5})
    assert d.mean == pytest.approx(-0.5) and d.std == pytest.approx(0.0)
    assert d.low == pytest.approx(-0.5) and d.high == pytest.approx(-0.5) and d.excludes_zero is True


def test_pairing_is_by_seed_not_by_position():
    method = {3: 4.0, 0: 1.0, 2: 3.0, 1: 2.0}  # insertion order is not seed order
    base = {1: 1.5, 3: 3.5, 0: 0.5, 2: 2.5}
    d = paired_difference(method, base)
    assert d.differences == (0.5, 0.5, 0.5, 0.5) and d.excludes_zero is True
    assert paired_difference(dict(reversed(list(method.items()))), base) == d
    # the same values paired with the wrong seeds (baseline shifted by one seed) tell another story
    wrong = paired_difference(method, {s: base[(s + 1) % 4] for s in base})
    assert wrong.differences != d.differences and wrong.excludes_zero is False


def test_a_missing_replicate_gives_no_statistic():
    d = paired_difference({0: 1.0, 1: 2.0, 2: None}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert not d.complete and (d.n, len(d.seeds)) == (2, 3)
    assert d.mean is None and d.low is None and d.excludes_zero is None
    # a seed planned for one side only is missing for the pair too
    d = paired_difference({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert (d.n, len(d.seeds), d.mean) == (2, 3, None)


# --------------------------------------------------------------------------------------------- the table


def _rows(tmp_path, fids: dict[tuple[str, int, int], float | None]):
    """Render-param rows for (row, steps, seed) → FID (None: planned, no metrics file)."""
    rows = []
    for (row, steps, seed), fid in fids.items():
        name = f"{row}-s{steps}-seed{seed}"
        rel = write_metrics(tmp_path, name, fid=fid, nfe=steps) if fid is not None else f"results/metrics/{name}.json"
        rows.append({"row": row, "label": row.upper(), "steps": steps, "seed": seed, "metrics": rel})
    return rows


TABLE = {"id": "t", "title": "T", "paired_against": "pd"}


def _fids(shift=lambda seed: 0.0):
    pd_ = {("pd", k, s): 10.0 + s + k for k in (1, 2) for s in range(5)}
    other = {("sferd", k, s): 10.0 + s + k - 1.0 + shift(s) for k in (1, 2) for s in range(5)}
    return {**pd_, **other}


def test_table_section_pairs_by_seed_whatever_the_row_order(tmp_path):
    fids = _fids(shift=lambda s: 0.1 * s)  # differences −1.0, −0.9, …, −0.6
    rows = _rows(tmp_path, fids)
    ctx = table_context("spec.yaml", TABLE, rows, [], root=tmp_path)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert table_context("spec.yaml", TABLE, shuffled, [], root=tmp_path)["paired"]["records"] == ctx["paired"]["records"]
    # by hand: mean −0.8, s = 0.1·√((4+1+0+1+4)/4) = 0.1581139, half = 2.7764451 · 0.1581139/√5 = 0.1963243
    [rec1, rec2] = ctx["paired"]["records"]
    assert (rec1["method"], rec1["steps"], rec2["steps"]) == ("sferd", 1, 2)
    assert rec1["mean"] == pytest.approx(-0.8) and rec1["high"] == pytest.approx(-0.8 + 0.1963243, abs=1e-6)
    text = render_markdown(ctx)
    assert "**Paired differences against PD**" in text
    assert "| SFERD | 1 | -0.80 | [-1.00, -0.60] | 0.16 | 5 | distinguishable from 0 |" in text
    # the seeds' values swapped within the SFERD row: same cells (mean ± std), another paired result
    swapped = [dict(r, seed=(r["seed"] + 2) % 5) if r["row"] == "sferd" else r for r in rows]
    ctx2 = table_context("spec.yaml", TABLE, swapped, [], root=tmp_path)
    assert ctx2["body"] == ctx["body"]
    assert ctx2["paired"]["records"][0]["mean"] == pytest.approx(-0.8)
    assert ctx2["paired"]["records"][0]["std"] != pytest.approx(rec1["std"])
    assert ctx2["paired"]["records"][0]["excludes_zero"] == "false"


def test_table_section_marks_missing_seeds(tmp_path):
    fids = _fids()
    fids[("pd", 2, 3)] = None
    text = render_markdown(table_context("spec.yaml", TABLE, _rows(tmp_path, fids), [], root=tmp_path))
    assert "| SFERD | 2 | missing (4/5 seeds) |  |  |  |  |" in text
    assert re.search(r"\| SFERD \| 1 \| -1\.00 \| \[-1\.00, -1\.00\] \| 0\.00 \| 5 \| distinguishable from 0 \|", text)


def test_without_paired_against_the_table_has_no_paired_section(tmp_path):
    ctx = table_context("spec.yaml", {"id": "t", "title": "T"}, _rows(tmp_path, _fids()), [], root=tmp_path)
    assert ctx["paired"] is None and "Paired differences" not in render_markdown(ctx)


# --------------------------------------------------------------------------------------------- the spec


def _spec_copy(tmp_path, edit) -> tuple[Path, str]:
    shutil.copy(ROOT / "specs/quickstart.yaml", tmp_path / "quickstart.yaml")
    text = edit((ROOT / SEEDS_SPEC).read_text(encoding="utf-8"))
    (tmp_path / "s.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "s.yaml", text


def _error(path: Path) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path, display_path="s.yaml")
    return str(e.value)


def _col(text: str, needle: str) -> str:
    """line:col (1-based) of the value after `paired_against: ` on the line holding `needle`."""
    lines = text.splitlines()
    [k] = [k for k, line in enumerate(lines) if needle in line]
    return f"{k + 1}:{lines[k].index('paired_against: ') + len('paired_against: ') + 1}"


def test_paired_against_an_unknown_method_is_a_located_error(tmp_path):
    path, text = _spec_copy(tmp_path, lambda t: t.replace("paired_against: pd ", "paired_against: pdd"))
    err = _error(path)
    assert f"s.yaml:{_col(text, 'paired_against: pdd')}: error: table.paired_against: no method named 'pdd'" in err


def test_paired_against_with_one_seed_is_a_located_error(tmp_path):
    path, text = _spec_copy(tmp_path, lambda t: re.sub(r"(?m)^seeds: .*$", "seeds: [2]", t))
    err = _error(path)
    assert f"s.yaml:{_col(text, '  paired_against: ')}: error: table.paired_against: paired differences need at least 2 " in err
    # no `seeds` at all: one run, the spec's `seed`
    path, text = _spec_copy(tmp_path, lambda t: re.sub(r"(?m)^seeds: .*\n", "", t))
    assert f"s.yaml:{_col(text, '  paired_against: ')}: error: table.paired_against: paired differences need" in _error(path)


def test_seeds_spec_renders_its_paired_section_and_csv_from_fake_metrics(tmp_path, monkeypatch):
    """The render stage of specs/quickstart-seeds.yaml on fake metrics files: table section and CSV agree with
    statistics computed here (sample std by hand, t from the printed table)."""
    from sferd.pipeline.stages import render

    spec = load_spec(ROOT / SEEDS_SPEC)
    [st] = [s for s in build_graph(spec, spec_path=SEEDS_SPEC) if s.kind == "render"]
    params = st.params
    assert params["table"]["paired_against"] == "pd"
    rng = random.Random(0)
    fid: dict[tuple[str, int, int], float] = {}
    for r in params["rows"]:
        value = 1.0 + rng.random() * 5  # teacher and calibration rows too: any positive number
        if r["seed"] is not None:
            fid[(r["row"], r["steps"], r["seed"])] = value
        (tmp_path / r["metrics"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["metrics"]).write_text(json.dumps({"fid": value, "num_samples": 1000, "seeds": "0-999"}))
    monkeypatch.chdir(tmp_path)
    render.run(st.name, params)
    text = Path(params["outputs"]["markdown"]).read_text(encoding="utf-8")
    table = list(csv.DictReader(io.StringIO(Path(params["outputs"]["paired"]).read_text(encoding="utf-8"))))
    assert params["outputs"]["paired"] == "results/tables/quickstart-seeds-paired.csv"
    assert [(r["method"], int(r["steps"])) for r in table] == [
        (m, k) for m in ("sferd", "sferd-ag", "sferd-sgp") for k in (1, 2, 4, 8)]
    for r in table:
        d = [fid[(r["method"], int(r["steps"]), s)] - fid[("pd", int(r["steps"]), s)] for s in range(5)]
        mean = sum(d) / 5
        s = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
        low, high = mean - T975[4] * s / math.sqrt(5), mean + T975[4] * s / math.sqrt(5)
        assert (r["seeds_measured"], r["n"], r["status"]) == ("0 1 2 3 4", "5", "ok")
        assert float(r["mean"]) == pytest.approx(mean, abs=2e-6)
        assert float(r["low"]) == pytest.approx(low, abs=2e-6) and float(r["high"]) == pytest.approx(high, abs=2e-6)
        assert r["excludes_zero"] == ("true" if low > 0 or high < 0 else "false")
        label = next(x["label"] for x in params["rows"] if x["row"] == r["method"])
        verdict = "distinguishable from 0" if low > 0 or high < 0 else "not distinguishable from 0"
        assert f"| {label} | {r['steps']} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {s:.2f} | 5 | {verdict} |" in text
    assert "[quickstart-seeds-paired.csv](quickstart-seeds-paired.csv)" in text


# --------------------------------------------------------------------------------------------- compiled files


def _stages(rel: str) -> dict:
    return YAML(typ="safe").load((ROOT / rel).read_text(encoding="utf-8"))["stages"]


def _parts(params_rel: str) -> set[str]:
    doc = json.loads((ROOT / params_rel).read_text(encoding="utf-8"))
    return {p["name"] for name, st in doc.items() for p in (st["parts"] if st.get("kind") == "bundle" else [{"name": name}])}


def test_seeds_pipeline_holds_only_the_other_seeds_stages():
    root, seeds = _stages("dvc.yaml"), _stages("stages/quickstart-seeds/dvc.yaml")
    assert not set(root) & set(seeds)  # seed 0 (the quickstart's own stages) compiles once, into the root pipeline
    assert not any("-seed" in n or n.startswith("quickstart-seeds") for n in root)
    assert not any("-seed0000" in n for n in seeds)
    spec = load_spec(ROOT / SEEDS_SPEC)
    planned = {s.name for s in build_graph(spec, spec_path=SEEDS_SPEC)}
    # DVC stages may be bundles (stage_granularity: row, inherited): compare the stages they run
    assert _parts("stages/quickstart-seeds/params.json") == planned - _parts("params.json")
    tags = {n: re.search(r"-seed(\d{4})-", n) for n in seeds}
    assert {n for n, m in tags.items() if m is None} == {"quickstart-seeds-render"}
    assert {int(m.group(1)) for m in tags.values() if m} == {1, 2, 3, 4}
    # every seed repeats the same chains, predictors, priors and FIDs as seed 0 (the quickstart's non-shared part)
    per_seed = {k: sorted(n.replace(f"-seed{k:04d}", "") for n, m in tags.items() if m and int(m.group(1)) == k)
                for k in (1, 2, 3, 4)}
    assert per_seed[1] == per_seed[2] == per_seed[3] == per_seed[4]
    assert set(per_seed[1]) <= set(root)
    produced = {}
    for name, st in [*root.items(), *seeds.items()]:
        for out in st.get("outs", []) + st.get("metrics", []):
            produced[out if isinstance(out, str) else next(iter(out))] = name
    for name, st in seeds.items():
        for dep in st["deps"]:
            assert dep in produced, f"{name}: nothing produces {dep}"  # code too: the root's fingerprint files
    render = seeds["quickstart-seeds-render"]
    assert {"results/tables/quickstart-seeds-paired.csv": {"cache": False}} in render["outs"]
    assert "results/metrics/digits-pd-s0001-fid.json" in render["deps"]  # seed 0's FID, from the root pipeline
