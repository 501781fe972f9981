"""Dataset loaders on small files written in the real formats: CIFAR-10's python pickles (read by torchvision)
and downsampled ImageNet 64×64 npz files; the data stage end to end, writing split folders (sferd/data/store.py);
missing data names what to fetch; ImageNet is streamed, so the stage's memory does not grow with the split."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import peak_rss_kib, write_fake_cifar10, write_fake_imagenet64

from sferd.data.cifar10 import load_cifar10
from sferd.data.imagenet64 import imagenet64_source
from sferd.data.store import open_split, write_split
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


def _imagenet64(tmp_path, train: bool):
    """The loader's source written as a split, read back: the path the data stage takes."""
    return write_split(tmp_path / ("train" if train else "val"), imagenet64_source(tmp_path / "in64", train=train))


def test_imagenet64_npz_planar_rgb_and_zero_based_labels(tmp_path):
    written = write_fake_imagenet64(tmp_path / "in64")
    split = _imagenet64(tmp_path, True)
    x, y = np.asarray(split.images), split.labels
    assert x.shape == (30, 64, 64, 3) and x.dtype == np.uint8
    data, labels = written["train_data_batch_1"]
    for c in range(3):
        assert x[1, 7, 9, c] == data[1, c * 4096 + 7 * 64 + 9]
    assert y[:3].tolist() == (labels - 1).tolist() and y.min() >= 0 and y.max() <= 999
    assert np.array_equal(x[-3:].transpose(0, 3, 1, 2).reshape(3, -1), written["train_data_batch_10"][0])
    # every file, in order 1…10, whole
    planar = np.concatenate([written[f"train_data_batch_{k}"][0] for k in range(1, 11)])
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(30, -1), planar)
    assert y.tolist() == np.concatenate([written[f"train_data_batch_{k}"][1] - 1 for k in range(1, 11)]).tolist()
    val = _imagenet64(tmp_path, False)
    assert val.images.shape == (3, 64, 64, 3) and val.labels.tolist() == (written["val_data"][1] - 1).tolist()


def test_imagenet64_files_larger_than_a_read_block_stream_whole(tmp_path, monkeypatch):
    import sferd.data.imagenet64 as in64

    monkeypatch.setattr(in64, "BLOCK_ROWS", 2)  # 5 rows per file: blocks of 2, 2, 1
    written = write_fake_imagenet64(tmp_path / "in64", per_file=5)
    x = np.asarray(_imagenet64(tmp_path, True).images)
    planar = np.concatenate([written[f"train_data_batch_{k}"][0] for k in range(1, 11)])
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(50, -1), planar)


def test_imagenet64_missing_files_are_listed(tmp_path):
    write_fake_imagenet64(tmp_path)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(StageError, match=r"missing under .*train_data_batch_7\.npz.*Download"):
        imagenet64_source(tmp_path, train=True)


def test_imagenet64_wrong_resolution_file_is_rejected(tmp_path):
    write_fake_imagenet64(tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3 * 32 * 32), np.uint8), labels=np.ones(2, int))
    with pytest.raises(StageError, match="expected uint8 N×12288"):
        imagenet64_source(tmp_path, train=False)


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a downsampled-ImageNet npz"),
    (lambda p: np.savez(p, data=np.zeros((2, 12288), np.uint8)), "with `data` and `labels`"),
    (lambda p: np.savez(p, data=np.zeros((2, 12288), np.uint8), labels=np.ones(3, int)), "2 images but 3 labels"),
    (lambda p: np.savez(p, data=np.zeros((2, 12288), np.uint8), labels=np.array([0, 1])), "labels must be 1…1000"),
])
def test_imagenet64_malformed_files_fail_before_anything_is_read(tmp_path, damage, match):
    write_fake_imagenet64(tmp_path)
    damage(tmp_path / "train_data_batch_4.npz")
    with pytest.raises(StageError, match=match) as e:
        imagenet64_source(tmp_path, train=True)
    assert "train_data_batch_4.npz" in str(e.value) and "\n" not in str(e.value)


def _data_params(tmp_path, dataset_id, source):
    ds = {"id": dataset_id, "heldout_fraction": 0.2, "split_seed": 0, "random_flip": True}
    p = {"s-data": {"kind": "data", "dataset": ds, "source": source, "outputs": {"dir": str(tmp_path / "out")}}}
    (tmp_path / "params.json").write_text(json.dumps(p))
    return str(tmp_path / "params.json")


def test_data_stage_materialises_cifar10_official_splits(tmp_path):
    written = write_fake_cifar10(tmp_path / "cifar")
    src = {"data_dir": str(tmp_path / "cifar"), "download": False, "verify_checksums": False}
    assert main(["--params", _data_params(tmp_path, "cifar10-32x32", src), "s-data"]) == 0
    train, held = open_split(tmp_path / "out/train"), open_split(tmp_path / "out/heldout")
    assert train.images.shape == (20, 32, 32, 3) and held.images.shape == (4, 32, 32, 3)
    assert held.labels.tolist() == written["test_batch"][1]
    assert train.labels[:4].tolist() == written["data_batch_1"][1]
    for split, want in ((train, load_cifar10(tmp_path / "cifar", train=True, verify_checksums=False)),
                        (held, load_cifar10(tmp_path / "cifar", train=False, verify_checksums=False))):
        assert np.array_equal(np.asarray(split.images), want[0]) and np.array_equal(split.labels, want[1])
    assert json.loads((tmp_path / "out/config.json").read_text())["num_heldout"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "heldout", "train"]
    for split in ("train", "heldout"):
        assert sorted(p.name for p in (tmp_path / "out" / split).iterdir()) == ["images.npy", "labels.npy"]


def test_data_stage_digits_stratified_and_byte_identical_on_rerun(tmp_path):
    params = _data_params(tmp_path, "digits-16x16", None)
    assert main(["--params", params, "s-data"]) == 0
    train, held = open_split(tmp_path / "out/train"), open_split(tmp_path / "out/heldout")
    assert len(train) + len(held) == 1797 and (train.resolution, train.channels) == (16, 1)
    assert np.bincount(held.labels, minlength=10).min() >= 30  # 20 % of every class (≥ 174 each)
    first = (train.sha256(), held.sha256())
    assert main(["--params", params, "s-data"]) == 0
    assert (open_split(tmp_path / "out/train").sha256(), open_split(tmp_path / "out/heldout").sha256()) == first


def test_data_stage_writes_imagenet64_splits(tmp_path):
    written = write_fake_imagenet64(tmp_path / "in64", per_file=2)
    src = {"data_dir": str(tmp_path / "in64"), "download": False, "verify_checksums": True}
    assert main(["--params", _data_params(tmp_path, "imagenet-64x64", src), "s-data"]) == 0
    train, held = open_split(tmp_path / "out/train"), open_split(tmp_path / "out/heldout")
    assert len(train) == 20 and len(held) == 2 and (train.resolution, train.channels) == (64, 3)
    data, labels = written["val_data"]
    assert np.array_equal(np.asarray(held.images).transpose(0, 3, 1, 2).reshape(2, -1), data)
    assert held.labels.tolist() == (labels - 1).tolist()


def test_data_stage_missing_imagenet_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = {"data_dir": str(tmp_path / "in64"), "download": False, "verify_checksums": True}
    assert main(["--params", _data_params(tmp_path, "imagenet-64x64", src), "s-data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("s-data: error: ImageNet 64×64 files missing") and "\n" not in err
    assert not (tmp_path / "out").exists()
    # only the validation file missing: the training split is not written first either
    write_fake_imagenet64(tmp_path / "in64")
    (tmp_path / "in64/val_data.npz").unlink()
    assert main(["--params", _data_params(tmp_path, "imagenet-64x64", src), "s-data"]) == 1
    assert "val_data.npz" in capsys.readouterr().err and not (tmp_path / "out").exists()


# The data stage's own command on fake ImageNet files, with its read and write blocks shrunk (2 and 4 MiB) so that a
# 125 MB split is 40 blocks: its peak RSS must exceed that of the same command on a 1/16 split by far less than the
# split (the old loader held the split twice: concatenated, then as npz).
STAGE_WITH_SMALL_BLOCKS = """
import sys
import sferd.data.imagenet64 as in64, sferd.data.store as store
from sferd.pipeline.run import main
in64.BLOCK_ROWS = 170
store.WRITE_BLOCK_BYTES = 4 << 20
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_data_stage_streams_imagenet_with_memory_independent_of_the_split(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back at once: the peak is live memory (test_store.py)
    peaks = {}
    for name, per_file in (("small", 64), ("large", 1024)):
        d = tmp_path / name
        write_fake_imagenet64(d / "in64", per_file=per_file)
        src = {"data_dir": str(d / "in64"), "download": False, "verify_checksums": True}
        code, peaks[name], out = peak_rss_kib(["-c", STAGE_WITH_SMALL_BLOCKS, "--params",
                                               _data_params(d, "imagenet-64x64", src), "s-data"], env=env)
        assert code == 0, out
        assert len(open_split(d / "out/train")) == 10 * per_file
    split_kib = 10 * 1024 * 12288 // 1024
    print(f"data stage peak RSS: 7.9 MB split {peaks['small'] / 1024:.1f} MiB, "
          f"{split_kib / 1024:.0f} MiB split {peaks['large'] / 1024:.1f} MiB")
    assert peaks["large"] - peaks["small"] < split_kib / 5


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
