"""FID feature-extractor weights: the bytes checked are the bytes measured with (issue 10, item 10).

The weights file is read once into a `FeatureWeights` (hash + weights_only load of those bytes). Swapping the file
afterwards, for other weights or for a pickle that runs a command, must change neither the features nor the
recorded hash, and no user file may ever reach torch-fidelity's `torch.load(weights_only=False)`.
Inception runs with random weights (torch-fidelity's real module, a few images at 32×32): plumbing, not numbers.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sferd.metrics import keys
from sferd.metrics.fid import compute_fid, extract_features, fid_provenance, resolve_feature_extractor_weights
from sferd.metrics.weights import FeatureExtractorWeightsError, FeatureWeights, load_feature_weights
from sferd.nn.digits_cnn import DigitsCNN, save_digits_cnn

DIGITS, INCEPTION = keys.EXTRACTOR_DIGITS_CNN, keys.EXTRACTOR_INCEPTION
_TORCH_LOAD = torch.load  # the tests' own full unpickling (showing a payload is live) bypasses _LoadSpy


class _RunsCommand:
    """Unpickling this runs a shell command: what a hostile weights file does under weights_only=False."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _hostile_weights(path: Path, marker: Path) -> None:
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _RunsCommand(f"touch {marker}")}, path)
    # The payload is live: the full unpickler runs it (a `touch` in the test's folder), so the tests can fail.
    _TORCH_LOAD(path, weights_only=False)
    assert marker.exists(), "the hostile file should run its command under weights_only=False"
    marker.unlink()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(seed: int, n: int, r: int, c: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, r, r, c), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ digits-cnn


def _digits_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = DigitsCNN(8, feature_dim=8, width=8)
    save_digits_cnn(path, net, config=net.config)
    return path


def test_digits_weights_swapped_after_loading_change_nothing(tmp_path):
    path = _digits_file(tmp_path / "model.pt", seed=0)
    sha_a = _sha(path)
    weights = load_feature_weights(DIGITS, path)
    assert isinstance(weights, FeatureWeights) and weights.sha256 == sha_a and weights.path == str(path)
    images = _images(0, 16, 8, 1)
    before = extract_features(images, feature_extractor=DIGITS, weights_path=weights)

    _digits_file(path, seed=1)  # other weights under the same path
    assert _sha(path) != sha_a
    after = extract_features(images, feature_extractor=DIGITS, weights_path=weights)
    assert np.array_equal(before, after)
    assert fid_provenance(feature_extractor=DIGITS, weights_path=weights)[keys.WEIGHTS_SHA256] == sha_a
    # a path is read afresh: the new file gives other features and another hash (so the check above can fail)
    fresh = extract_features(images, feature_extractor=DIGITS, weights_path=path)
    assert not np.allclose(before, fresh)
    assert fid_provenance(feature_extractor=DIGITS, weights_path=path)[keys.WEIGHTS_SHA256] == _sha(path)

    marker = tmp_path / "owned"
    _hostile_weights(path, marker)
    assert np.array_equal(extract_features(images, feature_extractor=DIGITS, weights_path=weights), before)
    with pytest.raises(FeatureExtractorWeightsError, match="weights_only=True"):
        extract_features(images, feature_extractor=DIGITS, weights_path=path)
    assert not marker.exists()


def test_digits_weights_of_another_kind_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "note": "no config"}, path)
    with pytest.raises(FeatureExtractorWeightsError, match="not a DigitsCNN checkpoint"):
        load_feature_weights(DIGITS, path)
    weights = load_feature_weights(DIGITS, _digits_file(tmp_path / "ok.pt", seed=0))
    with pytest.raises(ValueError, match="digits-cnn"):  # weights of one extractor never feed another
        extract_features(_images(0, 4, 8, 3), feature_extractor=INCEPTION, weights_path=weights)


# ------------------------------------------------------------------------------------------------ checks on the bytes


def test_expected_hash_is_checked_on_the_bytes_read(tmp_path):
    path = _digits_file(tmp_path / "model.pt", seed=0)
    assert load_feature_weights(DIGITS, path, expected_sha256=_sha(path).upper()).sha256 == _sha(path)
    with pytest.raises(FeatureExtractorWeightsError, match="expected " + "0" * 64):
        load_feature_weights(DIGITS, path, expected_sha256="0" * 64)


@pytest.mark.parametrize(
    "content",
    [
        {"w": torch.zeros(2), "n": 3},  # loads under weights_only, but is not a state dict
        {"block": {"w": torch.zeros(2)}},
        {"w": torch.zeros(4).to_sparse()},
        [torch.zeros(2)],
    ],
    ids=["int-value", "nested", "sparse", "list"],
)
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_inception_weights_must_be_a_plain_state_dict(tmp_path, content):
    path = tmp_path / "inception.pth"
    torch.save(content, path)
    with pytest.raises(FeatureExtractorWeightsError, match="plain state dict"):
        load_feature_weights(INCEPTION, path)


def test_hostile_weights_never_run(tmp_path):
    path, marker = tmp_path / "inception.pth", tmp_path / "owned"
    _hostile_weights(path, marker)
    for extractor in (INCEPTION, DIGITS):
        with pytest.raises(FeatureExtractorWeightsError, match="weights_only=True"):
            load_feature_weights(extractor, path)
        with pytest.raises(FeatureExtractorWeightsError, match="weights_only=True"):
            compute_fid(_images(0, 4, 8, 3), _images(1, 4, 8, 3), feature_extractor=extractor, weights_path=path)
    assert not marker.exists()


def test_oversized_weights_are_refused_unread(tmp_path, monkeypatch):
    import sferd.metrics.weights as weights_module

    path = _digits_file(tmp_path / "model.pt", seed=0)
    monkeypatch.setattr(weights_module, "MAX_WEIGHTS_BYTES", path.stat().st_size - 1)
    with pytest.raises(FeatureExtractorWeightsError, match="exceed"):
        load_feature_weights(DIGITS, path)


def test_verified_inception_takes_no_path(tmp_path):
    """Under sferd's registry name the user's path can never reach torch-fidelity's full unpickler."""
    from torch_fidelity.utils import create_feature_extractor

    from sferd.metrics.extractor import EXTRACTOR_INCEPTION_VERIFIED, registered_name

    assert registered_name(INCEPTION) == EXTRACTOR_INCEPTION_VERIFIED
    path = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(2)}, path)
    for given in (str(path), path, None):
        with pytest.raises(ValueError, match="load_feature_weights"):
            create_feature_extractor(EXTRACTOR_INCEPTION_VERIFIED, ["2048"], cuda=False,
                                     feature_extractor_weights_path=given)


def test_weights_repr_is_short(tmp_path):
    weights = load_feature_weights(DIGITS, _digits_file(tmp_path / "model.pt", seed=0))
    assert len(repr(weights)) < 200 and weights.sha256[:12] in repr(weights)


# ------------------------------------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def inception_states() -> tuple[dict, dict]:
    """Two random state dicts of torch-fidelity's InceptionV3, built without any weights file (its constructor
    always loads one, so the load is skipped while the module is initialised); B is A with every float shifted."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    original = cls.load_state_dict
    try:
        cls.load_state_dict = lambda self, sd, *a, **k: None
        torch.manual_seed(0)
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        net = cls("x", ["2048"], feature_extractor_weights_path=empty)
        state_a = {k: v.clone() for k, v in net.state_dict().items()}
    finally:
        cls.load_state_dict = original
    state_b = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in state_a.items()}
    return state_a, state_b


class _LoadSpy:
    """Records what every torch.load call reads, and with which weights_only."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[object, bool]] = []
        real = torch.load

        def spy(f, *a, **k):
            data = f.getvalue() if isinstance(f, io.BytesIO) else f
            self.calls.append((data, bool(k.get("weights_only", False))))
            return real(f, *a, **k)

        monkeypatch.setattr(torch, "load", spy)

    def full_unpickles(self) -> list[object]:
        return [data for data, weights_only in self.calls if not weights_only]

    def opened_paths(self) -> list[object]:
        return [data for data, _ in self.calls if isinstance(data, (str, os.PathLike))]


def _same_state(module: torch.nn.Module, state: dict) -> bool:
    got = module.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_inception_extractor_is_built_from_the_verified_tensors(tmp_path, inception_states, monkeypatch):
    """The extractor torch-fidelity gets holds A's tensors after the file became a command-running pickle or
    other weights; the full unpickler only ever reads bytes this process wrote."""
    from torch_fidelity.utils import create_feature_extractor

    from sferd.metrics.extractor import registered_name

    state_a, state_b = inception_states
    path, marker = tmp_path / "pt_inception.pth", tmp_path / "owned"
    torch.save(state_a, path)
    bytes_a = path.read_bytes()
    spy = _LoadSpy(monkeypatch)
    weights = load_feature_weights(INCEPTION, path)
    assert weights.sha256 == hashlib.sha256(bytes_a).hexdigest()
    name = registered_name(INCEPTION)

    def build(w):
        return create_feature_extractor(name, ["2048"], cuda=False, feature_extractor_weights_path=w, verbose=False)

    _hostile_weights(path, marker)
    assert _same_state(build(weights), state_a) and not marker.exists()
    with pytest.raises(FeatureExtractorWeightsError, match="weights_only=True"):  # given the path, it is refused
        resolve_feature_extractor_weights(INCEPTION, path)
    assert not marker.exists()

    torch.save(state_b, path)
    assert _same_state(build(weights), state_a)
    assert fid_provenance(feature_extractor=INCEPTION, weights_path=weights)[keys.WEIGHTS_SHA256] == weights.sha256
    # read afresh from the path, B arrives (so the checks above can fail)
    assert _same_state(build(load_feature_weights(INCEPTION, path)), state_b)

    assert spy.opened_paths() == []  # every read went through the one-read path (bytes → BytesIO)
    full = spy.full_unpickles()
    assert len(full) == 3 and all(isinstance(d, bytes) and d not in (bytes_a, path.read_bytes()) for d in full)


@pytest.mark.slow
def test_inception_features_and_fid_come_from_the_verified_tensors(tmp_path, inception_states, monkeypatch):
    """End to end through extract_features and torch_fidelity.calculate_metrics (compute_fid): the file swapped
    for a hostile pickle, then for other weights, changes neither the features nor the FID."""
    state_a, state_b = inception_states
    path, marker = tmp_path / "pt_inception.pth", tmp_path / "owned"
    torch.save(state_a, path)
    weights = load_feature_weights(INCEPTION, path)
    spy = _LoadSpy(monkeypatch)
    a = _images(0, 3, 32, 3)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    feats_a = extract_features(a, feature_extractor=INCEPTION, weights_path=weights, batch_size=3)
    feats_b = extract_features(b, feature_extractor=INCEPTION, weights_path=weights, batch_size=3)

    _hostile_weights(path, marker)
    assert np.array_equal(extract_features(a, feature_extractor=INCEPTION, weights_path=weights, batch_size=3),
                          feats_a)
    torch.save(state_b, path)
    fid = compute_fid(a, b, feature_extractor=INCEPTION, weights_path=weights, batch_size=3)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    ref = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(feats_a)),
                                   fid_features_to_statistics(torch.from_numpy(feats_b)), False)
    assert np.isfinite(fid) and fid == pytest.approx(float(ref["frechet_inception_distance"]), rel=1e-5)
    assert not np.allclose(extract_features(a, feature_extractor=INCEPTION, weights_path=path, batch_size=3), feats_a)
    assert not marker.exists() and spy.opened_paths() == []
