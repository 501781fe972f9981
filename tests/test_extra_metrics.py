"""Inception Score and precision/recall as spec options: validation with located errors, stage params that stay
unchanged at the default, torch-fidelity's numbers checked against formulas written here, the stage's metrics
file and the rendered tables.

The extractor is a seeded random DigitsCNN (as in test_fid.py): the checks are about plumbing and arithmetic. Its
classifier weights are scaled up so that class predictions are confident and the Inception Score is far from 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from fakes import write_metrics

from sferd.metrics import keys
from sferd.nn.digits_cnn import DigitsCNN, load_digits_cnn, save_digits_cnn, to_model_input
from sferd.pipeline.graph import build_graph
from sferd.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "specs/quickstart.yaml"
CALIBRATION_LINE = "  calibration: [heldout, noise]\n"
R = 16
N = 120
DIGITS = keys.EXTRACTOR_DIGITS_CNN


# ------------------------------------------------------------------------------------------------ spec


def _spec_text(metrics: str | None = None, *, replace: tuple[str, str] | None = None, append: str = "") -> str:
    text = QUICKSTART.read_text(encoding="utf-8")
    assert text.count(CALIBRATION_LINE) == 1
    if metrics is not None:
        text = text.replace(CALIBRATION_LINE, CALIBRATION_LINE + f"  metrics: {metrics}\n")
    if replace is not None:
        assert text.count(replace[0]) == 1
        text = text.replace(*replace)
    return text + append


def _load(tmp_path, text: str):
    path = tmp_path / "q.yaml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path, display_path="q.yaml")


def _errors(tmp_path, text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        _load(tmp_path, text)
    return [ln for ln in str(e.value).splitlines() if ": error: " in ln]


def _position(text: str, line_start: str, token: str) -> tuple[int, int]:
    """1-based line and column of `token` on the line starting with `line_start`."""
    lines = text.splitlines()
    [k] = [i for i, ln in enumerate(lines) if ln.startswith(line_start)]
    return k + 1, lines[k].index(token) + 1


def test_default_is_fid_only():
    spec = load_spec(QUICKSTART)
    assert spec.evaluation.metrics == ["fid"]


def test_spec_literals_match_the_metric_keys():
    from sferd.spec.models import MetricOption, MetricValue

    assert get_args(MetricOption) == keys.METRIC_OPTIONS
    assert set(get_args(MetricValue)) == {v for vals in keys.METRIC_VALUES.values() for v in vals}


def test_extra_metrics_are_accepted(tmp_path):
    spec = _load(tmp_path, _spec_text("[fid, isc, prc]"))
    assert spec.evaluation.metrics == ["fid", "isc", "prc"]


@pytest.mark.parametrize(
    "metrics, token, message",
    [
        ("[isc, prc]", "[", "`fid` is required"),
        ("[fid, isc, isc]", "[", "listed more than once: isc"),
        ("[fid, kid]", "kid", "'fid', 'isc' or 'prc'"),
    ],
)
def test_bad_metric_lists_are_located_errors(tmp_path, metrics, token, message):
    text = _spec_text(metrics)
    [err] = _errors(tmp_path, text)
    line, col = _position(text, "  metrics:", token)
    assert err.startswith(f"q.yaml:{line}:{col}: error: "), err
    assert message in err


def test_isc_with_an_extractor_without_logits_is_a_located_error(tmp_path, monkeypatch):
    """Both real extractors have class logits (next test), so an extractor without them is simulated."""
    monkeypatch.setitem(keys.EXTRACTOR_METRICS, DIGITS, (keys.METRIC_FID, keys.METRIC_PRC))
    text = _spec_text("[fid, isc]")
    [err] = _errors(tmp_path, text)
    line, col = _position(text, "  metrics:", "isc")
    assert err.startswith(f"q.yaml:{line}:{col}: error: evaluation.metrics.1: "), err
    assert "cannot compute isc (it has no class logits)" in err


def test_extractor_capabilities_match_torch_fidelity(tmp_path):
    """The torch-free table the spec checks read agrees with the registered extractors' own features."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from sferd.metrics.extractor import register_digits_extractor

    register_digits_extractor()
    for name, metrics in keys.EXTRACTOR_METRICS.items():
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        provided = cls.get_provided_features_list()
        for m in metrics:
            assert cls.get_default_feature_layer_for_metric(m) in provided, (name, m)
    assert FEATURE_EXTRACTORS_REGISTRY[keys.EXTRACTOR_INCEPTION].get_default_feature_layer_for_metric("isc") == "logits_unbiased"


def test_settings_are_torch_fidelity_defaults():
    from torch_fidelity.defaults import DEFAULTS

    assert keys.ISC_SPLITS_DEFAULT == DEFAULTS["isc_splits"] == 10
    assert keys.PRC_NEIGHBORHOOD_DEFAULT == DEFAULTS["prc_neighborhood"] == 3


def test_too_few_samples_for_the_is_splits(tmp_path):
    text = _spec_text("[fid, isc]", replace=("  num_samples: 1000\n", "  num_samples: 9\n"))
    [err] = _errors(tmp_path, text)
    line, col = _position(text, "  num_samples:", "9")
    assert err.startswith(f"q.yaml:{line}:{col}: error: evaluation.num_samples: "), err
    assert "at least 10 samples" in err
    _load(tmp_path, text.replace("  num_samples: 9\n", "  num_samples: 10\n"))  # the boundary is allowed


def test_reported_metric_must_be_computed(tmp_path):
    row = ("reported:\n  - system: Some paper\n    source: Paper, Table 1\n    metric: isc\n"
           "    values: {1: 9.5}\n")
    text = _spec_text(append=row)
    [err] = _errors(tmp_path, text)
    line, col = _position(text, "    metric: isc", "isc")
    assert err.startswith(f"q.yaml:{line}:{col}: error: reported.0.metric: "), err
    assert "isc is not computed by this spec: add isc to evaluation.metrics" in err
    _load(tmp_path, _spec_text("[fid, isc]", append=row))
    text = _spec_text("[fid, isc]", append=row.replace("metric: isc", "metric: recall"))
    [err] = _errors(tmp_path, text)
    assert "recall is not computed by this spec: add prc to evaluation.metrics" in err


# ------------------------------------------------------------------------------------------------ graph


def test_default_params_carry_no_extra_metrics():
    for st in build_graph(load_spec(QUICKSTART), spec_path="specs/quickstart.yaml"):
        assert "extra_metrics" not in st.params, st.name


def test_extra_metrics_reach_every_fid_stage_and_nothing_else(tmp_path):
    base = {s.name: s for s in build_graph(load_spec(QUICKSTART), spec_path="q.yaml")}
    stages = build_graph(_load(tmp_path, _spec_text("[prc, fid, isc]")), spec_path="q.yaml")
    assert [s.name for s in stages] == list(base)
    fid_kinds = 0
    for st in stages:
        params = dict(st.params)
        if st.kind in ("fid", "fid_sferd"):
            fid_kinds += 1
            # fixed order whatever the spec's order, so listing them differently re-runs nothing
            assert list(params["extra_metrics"]) == ["isc", "prc"]
            assert params.pop("extra_metrics") == {"isc": {"splits": 10}, "prc": {"neighborhood": 3}}
        elif st.kind == "render":
            assert params.pop("extra_metrics") == ["isc", "prc"]
        assert params == base[st.name].params, st.name
    assert fid_kinds == sum(name.endswith("-fid") for name in base) == 5 + 4 * 4 + 2


# ------------------------------------------------------------------------------------------------ numbers


def _blocky_images(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
    return np.kron(low, np.ones((R // 4, R // 4), dtype=np.uint8))[..., None]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(7)
    model = DigitsCNN(R, feature_dim=24, width=16)
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)  # confident predictions: IS well above 1
    path = tmp_path_factory.mktemp("digits_cnn") / "model.pt"
    save_digits_cnn(path, model, config=model.config)
    return str(path)


def _direct(weights: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool features and logits straight from the network, without torch-fidelity."""
    net = load_digits_cnn(weights)
    x = to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    with torch.no_grad():
        pool = net.features(x)
        return pool.double().numpy(), net.classifier(pool).double().numpy()


def _is_reference(logits: np.ndarray, splits: int, order: np.ndarray) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the split's marginal; mean and std over the splits."""
    z = logits[order] - logits.max(axis=1, keepdims=True)[order]
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n, scores = len(z), []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(lp)
        marginal = p.mean(axis=0)
        scores.append(float(np.exp((p * (lp - np.log(marginal))).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radius(feats: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _covered(points: np.ndarray, centres: np.ndarray, radius: np.ndarray) -> float:
    """Share of `points` inside at least one ball (centre, radius)."""
    d = np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    return float((d <= radius[None, :]).any(axis=1).mean())


@pytest.fixture(scope="module")
def sets():
    real = _blocky_images(0)
    fake = np.clip(_blocky_images(1).astype(int) + 40, 0, 255).astype(np.uint8)  # another distribution
    return real, fake


@pytest.fixture(scope="module")
def measured(weights, sets):
    from sferd.metrics.fid import measure_samples, reference_statistics

    real, fake = sets
    stats = reference_statistics(real, feature_extractor=DIGITS, weights_path=weights)
    extra = {"isc": {"splits": 10}, "prc": {"neighborhood": 3}}
    return stats, measure_samples(fake, stats, feature_extractor=DIGITS, weights_path=weights, extra=extra,
                                  reference_images=real, batch_size=32)


def test_inception_score_matches_the_formula(weights, sets, measured):
    from torch_fidelity.defaults import DEFAULTS

    _, fake = sets
    _, logits = _direct(weights, fake)
    order = np.random.RandomState(DEFAULTS["rng_seed"]).permutation(len(fake))  # torch-fidelity's shuffle
    mean, std = _is_reference(logits, 10, order)
    assert measured[1][keys.ISC] == pytest.approx(mean, rel=1e-5)
    assert measured[1][keys.ISC_STD] == pytest.approx(std, rel=1e-4, abs=1e-6)
    assert 1.2 < mean < 10.0  # not the degenerate value 1 (uniform or constant predictions)


def test_inception_score_one_split_is_order_free(weights, sets):
    from sferd.metrics.fid import inception_score

    _, fake = sets
    _, logits = _direct(weights, fake)
    ours = inception_score(logits.astype(np.float32), splits=1)
    assert ours[keys.ISC] == pytest.approx(_is_reference(logits, 1, np.arange(len(fake)))[0], rel=1e-5)
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(logits[:9], splits=10)


def test_precision_recall_match_the_knn_ball_formula(weights, sets, measured):
    real, fake = sets
    f_real, _ = _direct(weights, real)
    f_fake, _ = _direct(weights, fake)
    precision = _covered(f_fake, f_real, _knn_radius(f_real, 3))
    recall = _covered(f_real, f_fake, _knn_radius(f_fake, 3))
    # float32 distances in torch-fidelity vs float64 here: allow one point on a ball's boundary to flip
    assert measured[1][keys.PRECISION] == pytest.approx(precision, abs=1.01 / N)
    assert measured[1][keys.RECALL] == pytest.approx(recall, abs=1.01 / N)
    assert 0.0 < precision < 0.9  # a shifted set: the check is not trivially 1


def test_precision_recall_of_a_set_against_itself_are_one(weights, sets):
    from sferd.metrics.fid import measure_samples, reference_statistics

    real, _ = sets
    stats = reference_statistics(real, feature_extractor=DIGITS, weights_path=weights)
    out = measure_samples(real, stats, feature_extractor=DIGITS, weights_path=weights,
                          extra={"prc": {"neighborhood": 3}}, reference_images=real)
    assert out[keys.PRECISION] == 1.0 and out[keys.RECALL] == 1.0
    assert out[keys.FID] == pytest.approx(0.0, abs=1e-6) and keys.ISC not in out


def test_same_numbers_as_torch_fidelity_calculate_metrics(weights, sets, measured):
    """The stage's route (one extractor pass, stored FID statistics) gives what calculate_metrics gives."""
    import torch_fidelity

    from sferd.metrics.extractor import register_digits_extractor
    from sferd.metrics.fid import NpzImages, fid_against_statistics

    real, fake = sets
    register_digits_extractor()
    tf = torch_fidelity.calculate_metrics(
        input1=NpzImages(fake), input2=NpzImages(real), fid=True, isc=True, prc=True, feature_extractor=DIGITS,
        feature_extractor_weights_path=weights, cuda=False, verbose=False, save_cpu_ram=True, cache=False,
        batch_size=32,
    )
    stats, ours = measured
    assert ours[keys.FID] == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours[keys.FID] == fid_against_statistics(fake, stats, feature_extractor=DIGITS, weights_path=weights)
    assert ours[keys.ISC] == pytest.approx(tf[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert ours[keys.ISC_STD] == pytest.approx(tf[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-5, abs=1e-8)
    assert ours[keys.PRECISION] == tf[torch_fidelity.KEY_METRIC_PRECISION]
    assert ours[keys.RECALL] == tf[torch_fidelity.KEY_METRIC_RECALL]


def test_unknown_extra_metric_and_missing_reference_images_are_refused(weights, sets, measured):
    from sferd.metrics.fid import measure_samples

    real, fake = sets
    stats = measured[0]
    with pytest.raises(ValueError, match="unknown extra metrics"):
        measure_samples(fake, stats, feature_extractor=DIGITS, weights_path=weights, extra={"kid": {}})
    with pytest.raises(ValueError, match="reference images"):
        measure_samples(fake, stats, feature_extractor=DIGITS, weights_path=weights,
                        extra={"prc": {"neighborhood": 3}})


# ------------------------------------------------------------------------------------------------ the stage


def _stage_params(tmp_path: Path, weights: str, extra: dict | None) -> dict:
    from sferd.pipeline.stages import reference

    ref_dir = tmp_path / "results/x-reference-stats"
    if not (ref_dir / "stats.json").is_file():
        reference.run("x-reference-stats", {
            "kind": "reference", "feature_extractor": DIGITS, "feature_weights": weights,
            "reference": {"name": "x-train", "path": "results/x-data/train"}, "batch_size": 64,
            "outputs": {"dir": str(ref_dir)}})
    params = {
        "kind": "fid", "row": "heldout", "steps": None, "source": {"kind": "heldout", "path": "results/x-data/heldout"},
        "num_samples": 40, "sample_seed_start": 0, "sample_batch_size": 64, "feature_extractor": DIGITS,
        "feature_weights": weights,
        "reference": {"name": "x-train", "path": "results/x-data/train", "stats_dir": str(ref_dir)},
        "image_shape": [1, R, R], "dataset": {},
        "outputs": {"dir": "results/x-heldout-fid", "metrics": "results/metrics/x-heldout-fid.json"},
    }
    if extra is not None:
        params["extra_metrics"] = extra
    return params


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, sets):
    from fakes import write_split_arrays

    monkeypatch.chdir(tmp_path)
    real, fake = sets
    write_split_arrays(tmp_path / "results/x-data/train", real)
    write_split_arrays(tmp_path / "results/x-data/heldout", fake[:40])
    return tmp_path


def test_fid_stage_records_extra_metrics_and_their_settings(stage_dir, weights):
    from sferd.pipeline.stages import fid

    fid.run("x-heldout-fid", _stage_params(stage_dir, weights, None))
    plain = json.loads((stage_dir / "results/metrics/x-heldout-fid.json").read_text())
    new_keys = {keys.ISC, keys.ISC_STD, keys.ISC_SPLITS, keys.ISC_SHUFFLE_SEED, keys.PRECISION, keys.RECALL,
                keys.PRC_NEIGHBORHOOD, keys.PRC_NUM_REAL}
    assert not new_keys & set(plain)  # FID-only stages write exactly what they wrote before

    fid.run("x-heldout-fid", _stage_params(stage_dir, weights, {"isc": {"splits": 4}, "prc": {"neighborhood": 3}}))
    m = json.loads((stage_dir / "results/metrics/x-heldout-fid.json").read_text())
    assert new_keys <= set(m)
    assert m[keys.FID] == plain[keys.FID]
    assert (m[keys.ISC_SPLITS], m[keys.ISC_SHUFFLE_SEED], m[keys.PRC_NEIGHBORHOOD], m[keys.PRC_NUM_REAL]) == (4, 2020, 3, N)
    assert 1.0 <= m[keys.ISC] and 0.0 <= m[keys.PRECISION] <= 1.0 and 0.0 <= m[keys.RECALL] <= 1.0


def test_fid_stage_refuses_a_reference_set_other_than_the_statistics_one(stage_dir, weights):
    from fakes import write_split_arrays
    from sferd.util.errors import StageError
    from sferd.pipeline.stages import fid

    params = _stage_params(stage_dir, weights, {"prc": {"neighborhood": 3}})
    real, _ = _blocky_images(5), None
    write_split_arrays(stage_dir / "results/x-data/train", real)
    with pytest.raises(StageError, match="not the reference set"):
        fid.run("x-heldout-fid", params)


# ------------------------------------------------------------------------------------------------ tables


TABLE = {"id": "t", "title": "T"}


def _rows(root: Path) -> list[dict]:
    full = {"isc": 4.5, "isc_std": 0.1, "isc_splits": 10, "isc_shuffle_seed": 2020, "precision": 0.75,
            "recall": 0.5, "prc_neighborhood": 3, "prc_num_real": 1437}
    return [
        {"row": "pd", "label": "PD", "steps": 1, "seed": 0, "metrics": write_metrics(root, "pd1", fid=3.0, **full)},
        {"row": "pd", "label": "PD", "steps": 2, "seed": 0, "metrics": write_metrics(root, "pd2", fid=2.0)},  # before the option
        {"row": "pd", "label": "PD", "steps": 4, "seed": 0, "metrics": "results/metrics/absent.json"},
        {"row": "heldout", "label": "Held-out", "steps": None, "seed": None,
         "metrics": write_metrics(root, "held", fid=0.1, **{**full, "isc": 9.25, "precision": 0.875})},
    ]


def test_tables_render_extra_metrics_with_missing_cells(tmp_path):
    from sferd.report.table import render_markdown, table_context

    reported = [{"system": "P", "method": "pd", "source": "Paper", "metric": "isc", "values": {1: 8.0}},
                {"system": "Q", "method": "pd", "source": "Paper", "metric": "fid", "values": {1: 9.0}}]
    text = render_markdown(table_context("spec.yaml", TABLE, _rows(tmp_path), reported, root=tmp_path,
                                         extra_metrics=["isc", "prc"]))
    fid_part, rest = text.split("**Inception Score**")
    assert "| PD | 3.00 | 2.00 | missing |" in fid_part
    assert "| P |" not in fid_part and "| Q | 9.00 |" in fid_part  # each paper number in its own metric's table
    isc_part, rest = rest.split("**Precision**")
    assert "| PD | 4.50 | missing | missing |" in isc_part and "| P | 8.00 |  |  | Paper |" in isc_part
    precision_part, rest = rest.split("**Recall**")
    assert "| PD | 0.750 | missing | missing |" in precision_part
    assert "| PD | 0.500 | missing | missing |" in rest
    assert "| set | Inception Score | Precision | Recall |" in rest and "| Held-out | 9.25 | 0.875 | 0.500 |" in rest
    assert "- isc_splits: 10" in rest and "- prc_neighborhood: 3" in rest and "- prc_num_real: 1437" in rest


def test_tables_without_extra_metrics_show_only_fid(tmp_path):
    from sferd.report.table import render_markdown, table_context

    rows = _rows(tmp_path)
    text = render_markdown(table_context("spec.yaml", TABLE, rows, [], root=tmp_path))
    assert "Inception Score" not in text and "Precision" not in text and "isc_splits" not in text
    assert "| PD | 3.00 | 2.00 | missing |" in text
