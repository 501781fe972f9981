"""FID through torch-fidelity with the digits-CNN extractor, checked against independent computations.

A randomly initialised (seeded) DigitsCNN stands in for the trained one: every check here is about plumbing and
arithmetic (input format, registration, statistics), which does not depend on the classifier being any good.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from sferd.metrics import keys
from sferd.metrics.fid import (
    FeatureExtractorWeightsError,
    NpzImages,
    compute_fid,
    extract_features,
    feature_statistics,
    fid_provenance,
    file_sha256,
    frechet_distance,
    resolve_feature_extractor_weights,
)
from sferd.nn.digits_cnn import DigitsCNN, load_digits_cnn, save_digits_cnn

R = 16
N = 200
FEATURE_DIM = 32
DIGITS = keys.EXTRACTOR_DIGITS_CNN
INCEPTION = keys.EXTRACTOR_INCEPTION


def _blocky_images(seed: int, n: int = N) -> np.ndarray:
    """n x R x R x 1 uint8: random 4x4 grey patterns upsampled, i.e. structured (not iid pixel) images."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
    return np.kron(low, np.ones((R // 4, R // 4), dtype=np.uint8))[..., None]


def _brighten(images: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + amount, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(1234)
    # Narrower than the default network: the checks are about plumbing, and this keeps the suite fast on 2 cores.
    model = DigitsCNN(R, feature_dim=FEATURE_DIM, width=16)
    path = tmp_path_factory.mktemp("digits_cnn") / "model.pt"
    save_digits_cnn(path, model, config={**model.config, "note": "random init"})
    return str(path)


@pytest.fixture(scope="module")
def images_a() -> np.ndarray:
    return _blocky_images(0)


@pytest.fixture(scope="module")
def images_b() -> np.ndarray:
    return _blocky_images(1)


def _fid(a, b, weights, **kw) -> float:
    return compute_fid(a, b, feature_extractor=DIGITS, weights_path=weights, **kw)


# ------------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_digits_cnn_shapes(resolution):
    model = DigitsCNN(resolution, feature_dim=24, width=16)
    x = torch.rand(3, 1, resolution, resolution) * 2 - 1
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 24)
    with pytest.raises(ValueError):
        model(torch.zeros(3, 1, resolution * 2, resolution * 2))


def test_digits_cnn_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(8, feature_dim=32, width=16)
    path = tmp_path / "m.pt"
    save_digits_cnn(path, model, config=model.config)
    loaded = load_digits_cnn(path)
    assert loaded.config == model.config
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="disagrees"):
        save_digits_cnn(path, model, config={**model.config, "width": 32})


# ------------------------------------------------------------------------------------------------ inputs


def test_npz_images_format_and_round_trip(tmp_path, images_a):
    path = tmp_path / "samples.npz"
    np.savez(path, images=images_a, labels=np.zeros(N, np.int64), seeds=np.arange(N, dtype=np.int64))
    ds = NpzImages.from_npz(path)
    assert len(ds) == N
    x = ds[7]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, R, R)
    for c in range(3):
        np.testing.assert_array_equal(x[c].numpy(), images_a[7, :, :, 0])

    rgb = np.stack([images_a[..., 0], _brighten(images_a, 10)[..., 0], images_a[..., 0] // 2], axis=-1)
    y = NpzImages(rgb)[3]
    np.testing.assert_array_equal(y.permute(1, 2, 0).numpy(), rgb[3])

    with pytest.raises(TypeError, match="uint8"):
        NpzImages(images_a.astype(np.float32) / 255)
    with pytest.raises(KeyError):
        NpzImages.from_npz(path, key="nope")


# ------------------------------------------------------------------------------------------------ extractor


def test_registration_is_idempotent(monkeypatch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    import sferd.metrics.extractor as extractor

    assert extractor.register_digits_extractor() == DIGITS
    assert extractor.register_digits_extractor() == DIGITS
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS] is extractor.FeatureExtractorDigitsCNN

    # A re-imported module must take over the entry instead of tripping torch-fidelity's duplicate check.
    reloaded = importlib.reload(extractor)
    assert reloaded.register_digits_extractor() == DIGITS
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS] is reloaded.FeatureExtractorDigitsCNN

    # A different class under our name is a real conflict.
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, DIGITS, FeatureExtractorVGG16)
    with pytest.raises(RuntimeError, match="taken"):
        reloaded.register_digits_extractor()


def test_extractor_features_match_network(weights, images_a):
    """uint8 RGB-replicated input -> grey in [-1, 1] -> DigitsCNN.features, computed here by hand."""
    feats = extract_features(images_a, feature_extractor=DIGITS, weights_path=weights)
    assert feats.shape == (N, FEATURE_DIM) and feats.dtype == np.float32
    net = load_digits_cnn(weights)
    x = torch.from_numpy(images_a).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = net.features(x).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ FID


def test_fid_equals_direct_torch_fidelity_call(weights, images_a, images_b):
    import torch_fidelity
    from torch.utils.data import Dataset

    from sferd.metrics.extractor import register_digits_extractor

    class Plain(Dataset):
        """Independent of NpzImages: HWC grey -> CHW RGB uint8, written differently."""

        def __init__(self, a):
            self.a = a

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            return torch.tensor(np.repeat(self.a[i], 3, axis=2).transpose(2, 0, 1).copy())

    ours = _fid(images_a, images_b, weights)
    register_digits_extractor()
    direct = torch_fidelity.calculate_metrics(
        input1=Plain(images_a),
        input2=Plain(images_b),
        fid=True,
        feature_extractor=DIGITS,
        feature_extractor_weights_path=weights,
        cuda=False,
        verbose=False,
        save_cpu_ram=True,
        cache=False,
    )[torch_fidelity.KEY_METRIC_FID]
    assert ours > 0
    assert ours == pytest.approx(direct, rel=1e-6)


def test_fid_equals_reference_formula(weights, images_a, images_b):
    b = _brighten(images_b, 25)  # a set clearly apart from images_a, so the FID is not a tiny cancellation
    ours = _fid(images_a, b, weights)
    fa = extract_features(images_a, feature_extractor=DIGITS, weights_path=weights).astype(np.float64)
    fb = extract_features(b, feature_extractor=DIGITS, weights_path=weights).astype(np.float64)
    mu_a, sig_a = fa.mean(axis=0), np.cov(fa, rowvar=False)
    mu_b, sig_b = fb.mean(axis=0), np.cov(fb, rowvar=False)
    reference = frechet_distance(mu_a, sig_a, mu_b, sig_b)
    assert reference > 0
    assert ours == pytest.approx(reference, rel=1e-4)
    # feature_statistics is the helper stages use; same numbers.
    m, s = feature_statistics(fa)
    np.testing.assert_allclose(m, mu_a)
    np.testing.assert_allclose(s, sig_a)


def test_frechet_distance_closed_form():
    """Diagonal Gaussians: FID = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_identical_sets_is_zero(weights, images_a):
    assert abs(_fid(images_a, images_a, weights)) < 1e-3


def test_fid_grows_with_shift(weights, images_a):
    small = _fid(images_a, _brighten(images_a, 20), weights)
    large = _fid(images_a, _brighten(images_a, 80), weights)
    assert 0 < small < large


def test_fid_independent_of_batch_size(weights, images_a, images_b):
    f16 = _fid(images_a, images_b, weights, batch_size=16)
    f64 = _fid(images_a, images_b, weights, batch_size=64)
    assert f16 == pytest.approx(f64, rel=1e-5)


def test_provenance(weights):
    prov = fid_provenance(feature_extractor=DIGITS, weights_path=weights)
    assert prov == {
        keys.FID_IMPL: "torch-fidelity==0.4.0",
        keys.FEATURE_EXTRACTOR: DIGITS,
        keys.WEIGHTS_SHA256: file_sha256(weights),
    }
    assert len(prov[keys.WEIGHTS_SHA256]) == 64


# ------------------------------------------------------------------------------------------------ missing weights


def test_digits_extractor_requires_weights(tmp_path, images_a):
    with pytest.raises(FeatureExtractorWeightsError, match="weights_path"):
        _fid(images_a, images_a, None)
    with pytest.raises(FeatureExtractorWeightsError, match="does not exist"):
        _fid(images_a, images_a, str(tmp_path / "missing.pt"))


@pytest.fixture
def no_download(monkeypatch):
    """Make any attempt by torch / torch-fidelity to fetch weights fail loudly instead of hanging offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(*args, **kwargs):
        raise AssertionError("a weights download was attempted")

    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_inception_without_local_weights_names_the_download(tmp_path, no_download):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    # The check precedes any work on the images: these are not even valid images.
    not_images = object()
    with pytest.raises(FeatureExtractorWeightsError) as err:
        compute_fid(not_images, not_images, feature_extractor=INCEPTION, weights_path=None, cache_root=tmp_path)
    message = str(err.value)
    assert URL_INCEPTION_V3 in message
    assert str(tmp_path / "weights-inception-2015-12-05-6726825d.pth") in message
    assert "weights path" in message  # says a local file may be passed instead

    missing = tmp_path / "elsewhere" / "inception.pth"
    with pytest.raises(FeatureExtractorWeightsError) as err:
        compute_fid(not_images, not_images, feature_extractor=INCEPTION, weights_path=str(missing))
    assert URL_INCEPTION_V3 in str(err.value) and str(missing) in str(err.value)


def test_inception_weights_found_in_cache_root(tmp_path, no_download):
    cached = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"w": torch.zeros(3)}, cached)  # a plain tensor file (the suite refuses anything needing unpickling)
    assert resolve_feature_extractor_weights(INCEPTION, None, cache_root=tmp_path) == str(cached)
    prov = fid_provenance(feature_extractor=INCEPTION, weights_path=None, cache_root=tmp_path)
    assert prov[keys.WEIGHTS_SHA256] == file_sha256(cached)


def test_unknown_extractor_rejected(images_a):
    with pytest.raises(ValueError, match="supported"):
        compute_fid(images_a, images_a, feature_extractor="vgg16", weights_path=None)


def test_fid_against_stored_statistics_equals_torch_fidelity(weights, images_a, images_b):
    """The FID stages measure against the reference-statistics stage's (mu, sigma): same number as
    torch-fidelity computing both sides itself."""
    from sferd.metrics.fid import fid_against_statistics, reference_statistics, statistics_file_name

    b = _brighten(images_b, 25)
    stats = reference_statistics(images_a, feature_extractor=DIGITS, weights_path=weights)
    assert int(stats["num_images"]) == len(images_a) and stats["sigma"].shape == (stats["mu"].shape[0],) * 2
    stored = {k: np.asarray(v) for k, v in stats.items()}  # as read back from the npz
    ours = fid_against_statistics(b, stored, feature_extractor=DIGITS, weights_path=weights)
    assert ours > 0 and ours == pytest.approx(_fid(b, images_a, weights), rel=1e-6)
    assert fid_against_statistics(images_a, stored, feature_extractor=DIGITS, weights_path=weights) == pytest.approx(0, abs=1e-6)
    name = statistics_file_name(DIGITS, "a" * 64, "b" * 64)
    assert name == f"fid-stats-{DIGITS}-ref{'a' * 12}-w{'b' * 12}.npz"


@pytest.mark.slow
def test_inception_path_offline_with_a_local_random_weights_file(tmp_path, monkeypatch):
    """The paper-scale extractor end to end without network: torch-fidelity's real InceptionV3 module with
    random weights written to a local file (built by skipping the weight load once), then FID through the
    suite's code with `weights_path` pointing at that file. Checks plumbing, not the number."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    from sferd.metrics.fid import compute_fid, fid_against_statistics, fid_provenance, reference_statistics

    def refuse(*a, **k):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)
    seed_file = tmp_path / "seed.pth"
    torch.save({}, seed_file)
    original = inception.FeatureExtractorInceptionV3.load_state_dict
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(seed_file))
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", original)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    kw = dict(feature_extractor="inception-v3-compat", weights_path=weights, batch_size=6)
    fid = compute_fid(a, b, **kw)
    assert np.isfinite(fid) and fid > 0
    stats = reference_statistics(a, **kw)
    assert fid_against_statistics(b, stats, **kw) == pytest.approx(fid, rel=1e-4)
    prov = fid_provenance(feature_extractor="inception-v3-compat", weights_path=weights)
    assert prov["feature_extractor"] == "inception-v3-compat" and len(prov["weights_sha256"]) == 64


class PickledThing:
    """An arbitrary class: loading it needs the full unpickler, which is what must be refused."""


def test_inception_weights_that_need_unpickling_are_refused(tmp_path):
    """A weights file with a pickled object (not just tensors) never reaches torch-fidelity's full unpickler."""
    from sferd.metrics.fid import FeatureExtractorWeightsError, resolve_feature_extractor_weights

    bad = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(2), "odd": PickledThing()}, bad)
    with pytest.raises(FeatureExtractorWeightsError, match="weights_only=True"):
        resolve_feature_extractor_weights("inception-v3-compat", bad)
    good = tmp_path / "ok.pth"
    torch.save({"w": torch.zeros(2)}, good)
    assert resolve_feature_extractor_weights("inception-v3-compat", good) == str(good)
