"""Dataset loaders on small files written in the real formats: CIFAR-10's python pickles (read by torchvision)
and downsampled ImageNet 64×64 npz files; the data stage end to end; missing data names what to fetch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fakes import write_fake_cifar10, write_fake_imagenet64

from sferd.data.cifar10 import load_cifar10
from sferd.data.imagenet64 import load_imagenet64
from sferd.util.errors import StageError
from sferd.pipeline.run import main

ROOT = Path(__file__).resolve().parents[1]


def test_cifar10_pickles_load_through_torchvision_in_hwc_order(tmp_path):
    written = write_fake_cifar10(tmp_path)
    x, y = load_cifar10(tmp_path, train=True, verify_checksums=False)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    data, labels = written["data_batch_1"]
    # pixel (row 2, col 5) of image 0: channel c is at c·1024 + 2·32 + 5 in the planar row
    for c in range(3):
        assert x[0, 2, 5, c] == data[0, c * 1024 + 2 * 32 + 5]
    assert y[:4].tolist() == labels
    assert y[-4:].tolist() == written["data_batch_5"][1]
    xt, yt = load_cifar10(tmp_path, train=False, verify_checksums=False)
    assert xt.shape == (4, 32, 32, 3) and yt.tolist() == written["test_batch"][1]


def test_cifar10_checksums_are_checked_by_default(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(StageError, match="not found or corrupted"):
        load_cifar10(tmp_path, train=True)  # the test files are not the real ones


def test_cifar10_missing_names_url_and_folder(tmp_path):
    with pytest.raises(StageError) as e:
        load_cifar10(tmp_path / "nowhere", train=True)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "\n" not in msg


def test_imagenet64_npz_planar_rgb_and_zero_based_labels(tmp_path):
    written = write_fake_imagenet64(tmp_path)
    x, y = load_imagenet64(tmp_path, train=True)
    assert x.shape == (30, 64, 64, 3) and x.dtype == np.uint8
    data, labels = written["train_data_batch_1"]
    for c in range(3):
        assert x[1, 7, 9, c] == data[1, c * 4096 + 7 * 64 + 9]
    assert y[:3].tolist() == (labels - 1).tolist() and y.min() >= 0 and y.max() <= 999
    assert np.array_equal(x[-3:].transpose(0, 3, 1, 2).reshape(3, -1), written["train_data_batch_10"][0])
    xv, yv = load_imagenet64(tmp_path, train=False)
    assert xv.shape == (3, 64, 64, 3) and yv.tolist() == (written["val_data"][1] - 1).tolist()


def test_imagenet64_missing_files_are_listed(tmp_path):
    write_fake_imagenet64(tmp_path)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(StageError, match=r"missing under .*train_data_batch_7\.npz.*Download"):
        load_imagenet64(tmp_path, train=True)


def test_imagenet64_wrong_resolution_file_is_rejected(tmp_path):
    write_fake_imagenet64(tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3 * 32 * 32), np.uint8), labels=np.ones(2, int))
    with pytest.raises(StageError, match="expected uint8 N×12288"):
        load_imagenet64(tmp_path, train=False)


def _data_params(tmp_path, dataset_id, source):
    ds = {"id": dataset_id, "heldout_fraction": 0.2, "split_seed": 0, "random_flip": True}
    p = {"s-data": {"kind": "data", "dataset": ds, "source": source, "outputs": {"dir": str(tmp_path / "out")}}}
    (tmp_path / "params.json").write_text(json.dumps(p))
    return str(tmp_path / "params.json")


def test_data_stage_materialises_cifar10_official_splits(tmp_path):
    write_fake_cifar10(tmp_path / "cifar")
    src = {"data_dir": str(tmp_path / "cifar"), "download": False, "verify_checksums": False}
    assert main(["--params", _data_params(tmp_path, "cifar10-32x32", src), "s-data"]) == 0
    train, held = np.load(tmp_path / "out/train.npz"), np.load(tmp_path / "out/heldout.npz")
    assert train["images"].shape == (20, 32, 32, 3) and held["images"].shape == (4, 32, 32, 3)
    assert json.loads((tmp_path / "out/config.json").read_text())["num_heldout"] == 4


def test_data_stage_missing_imagenet_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = {"data_dir": str(tmp_path / "in64"), "download": False, "verify_checksums": True}
    assert main(["--params", _data_params(tmp_path, "imagenet-64x64", src), "s-data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("s-data: error: ImageNet 64×64 files missing") and "\n" not in err
    assert not (tmp_path / "out").exists()


def _spec_text(dataset_block: str) -> str:
    src = (ROOT / "tests/specs/tiny.yaml").read_text()
    start = src.index("dataset:\n")
    end = src.index("features:\n")
    return src[:start] + dataset_block + src[end:]


def test_spec_requires_a_source_for_downloaded_datasets(tmp_path):
    from sferd.spec import load_spec
    from sferd.spec.loader import SpecError

    f = tmp_path / "s.yaml"
    f.write_text(_spec_text("dataset:\n  id: cifar10-32x32\n"))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert any("needs `dataset.source.data_dir`" in i.format() and i.format().startswith(f"{f}:") for i in e.value.issues)
    f.write_text(_spec_text("dataset:\n  id: digits-8x8\n  source:\n    data_dir: data/digits\n"))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert any("digits are embedded" in i.format() for i in e.value.issues)
