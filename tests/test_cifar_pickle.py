"""The CIFAR-10 reader never runs code from a file under `data_dir` (issue 10, item 9).

Valid batches are written here in the real format: as Python 2 / numpy 1.x wrote the official files (assembled
opcode by opcode below, since no Python 2 is at hand), as Python 3 / numpy 2 re-pickles them (tests/fakes.py),
and at protocol 4. Hostile pickles must be refused with a message naming what they asked for, and their payload
must not run: each payload is first shown to run under the stock unpickler (so the test can fail), then fed to
the reader, and the marker file it would create must not appear.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import write_fake_cifar10

import sferd.data.cifar10 as cifar10
from sferd.data.cifar10 import load_cifar10, unpickle_batch
from sferd.util.errors import StageError

BATCHES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


# ------------------------------------------------------------------------------------------------ real-format writers


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])  # BININT1
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)  # BININT2
    return b"J" + struct.pack("<i", v)  # BININT


def _py2_str(s: str | bytes) -> bytes:
    """A Python 2 `str` (a byte string): SHORT_BINSTRING / BINSTRING, which Python 3 reads according to `encoding`."""
    b = s.encode("latin-1") if isinstance(s, str) else s
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


class _Raw(bytes):
    """Opcodes spliced into a Python 2 pickle as they are (a hostile element inside an otherwise valid batch)."""


def _py2_value(v) -> bytes:
    if isinstance(v, _Raw):
        return bytes(v)
    if isinstance(v, np.ndarray):
        assert v.dtype == np.uint8
        # numpy 1.x under Python 2: ndarray.__reduce__ = (_reconstruct, (ndarray, (0,), 'b'), state) with
        # state = (1, shape, dtype, is_fortran, raw string); dtype.__reduce__ = (dtype, ('u1', 0, 1), dtype state)
        shape = b"(" + b"".join(_py2_int(n) for n in v.shape) + b"t"
        dtype = (b"cnumpy\ndtype\n" + _py2_str("u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
                 + b"(" + _py2_int(3) + _py2_str("|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0)
                 + b"tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str("b")
                + b"\x87R" + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(v.tobytes()) + b"tb")
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, (str, bytes)):
        return _py2_str(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e" if v else b"]"
    if isinstance(v, dict):
        return b"}(" + b"".join(_py2_value(k) + _py2_value(x) for k, x in v.items()) + b"u"
    raise TypeError(type(v))


def py2_pickle(obj) -> bytes:
    """What cPickle.dump(obj, f, 2) wrote under Python 2 with numpy 1.x (the official batches' format)."""
    return b"\x80\x02" + _py2_value(obj) + b"."


def _batch(rng, n: int, name: str) -> dict:
    return {"batch_label": f"training batch {name}", "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{k:04d}.png" for k in range(n)]}


def _write_folder(root: Path, encode, n: int = 3, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder = root / cifar10.FOLDER
    folder.mkdir(parents=True)
    batches = {}
    for name in BATCHES:
        batches[name] = _batch(rng, n, name)
        (folder / name).write_bytes(encode(batches[name]))
    return batches


def _expected(batches: dict, names) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([batches[k]["data"] for k in names])
    labels = np.concatenate([batches[k]["labels"] for k in names]).astype(np.int64)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


# ------------------------------------------------------------------------------------------------ valid files


def test_python2_numpy1_batches_load(tmp_path):
    batches = _write_folder(tmp_path, py2_pickle)
    raw = (tmp_path / cifar10.FOLDER / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw  # the numpy 1.x module path
    # the writer is faithful: the stock unpickler reads it back as the batch (pixel bytes through latin-1 str)
    stock = pickle.loads(raw, encoding="latin1")
    assert np.array_equal(stock["data"], batches["data_batch_1"]["data"])
    x, y = load_cifar10(tmp_path, train=True, verify_checksums=False)
    ex, ey = _expected(batches, BATCHES[:5])
    assert x.dtype == np.uint8 and x.shape == (15, 32, 32, 3) and x.flags.c_contiguous
    assert np.array_equal(x, ex) and y.dtype == np.int64 and np.array_equal(y, ey)
    xt, yt = load_cifar10(tmp_path, train=False, verify_checksums=False)
    assert np.array_equal(xt, _expected(batches, ["test_batch"])[0]) and yt.tolist() == batches["test_batch"]["labels"]


def test_python2_pixel_bytes_above_127_survive(tmp_path):
    """Every byte value round-trips (the raw string is read as latin-1 text and turned back into bytes)."""
    rng = np.random.default_rng(3)
    batch = _batch(rng, 256 // 3 + 1, "x")
    batch["data"][:] = (np.arange(batch["data"].size) % 256).reshape(batch["data"].shape).astype(np.uint8)
    out = unpickle_batch(py2_pickle(batch), source="b")
    assert np.array_equal(out["data"], batch["data"]) and out["labels"] == batch["labels"]


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_python3_numpy2_batches_load(tmp_path, protocol):
    batches = _write_folder(tmp_path, lambda b: pickle.dumps(b, protocol=protocol))
    raw = (tmp_path / cifar10.FOLDER / "data_batch_1").read_bytes()
    assert b"numpy._core.multiarray" in raw  # numpy 2's module path
    x, y = load_cifar10(tmp_path, train=True, verify_checksums=False)
    ex, ey = _expected(batches, BATCHES[:5])
    assert np.array_equal(x, ex) and np.array_equal(y, ey)


def test_shared_fake_writer_loads(tmp_path):
    written = write_fake_cifar10(tmp_path, per_batch=2)
    x, _ = load_cifar10(tmp_path, train=False, verify_checksums=False)
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(2, -1), written["test_batch"][0])


def test_checksums_are_the_official_ones():
    from torchvision.datasets import CIFAR10

    assert [list(t) for t in cifar10.TRAIN_FILES] == CIFAR10.train_list
    assert [list(t) for t in cifar10.TEST_FILES] == CIFAR10.test_list
    assert (cifar10.URL, cifar10.ARCHIVE, cifar10.ARCHIVE_MD5, cifar10.FOLDER) == (
        CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5, CIFAR10.base_folder)


def _official_sums_of(monkeypatch, folder: Path) -> None:
    """Pretend the files in `folder` are the official ones (their md5 sums become the expected sums)."""
    def sums(names):
        return tuple((n, hashlib.md5((folder / n).read_bytes()).hexdigest()) for n, _ in names)

    monkeypatch.setattr(cifar10, "TRAIN_FILES", sums(cifar10.TRAIN_FILES))
    monkeypatch.setattr(cifar10, "TEST_FILES", sums(cifar10.TEST_FILES))


def test_md5_verified_files_load_and_a_changed_byte_is_refused(tmp_path, monkeypatch):
    batches = _write_folder(tmp_path, py2_pickle)
    folder = tmp_path / cifar10.FOLDER
    _official_sums_of(monkeypatch, folder)
    x, _ = load_cifar10(tmp_path, train=True)  # verify_checksums defaults to True
    assert np.array_equal(x, _expected(batches, BATCHES[:5])[0])
    raw = bytearray((folder / "data_batch_3").read_bytes())
    raw[-10] ^= 1  # a pixel byte
    (folder / "data_batch_3").write_bytes(bytes(raw))
    with pytest.raises(StageError, match=r"not found or corrupted.*data_batch_3 has md5"):
        load_cifar10(tmp_path, train=True)


def test_the_bytes_unpickled_are_the_bytes_verified(tmp_path, monkeypatch):
    """Swapping a file for a hostile one right after its checksum was checked changes nothing: the reader
    unpickles the bytes it hashed, never the path again."""
    batches = _write_folder(tmp_path, py2_pickle)
    folder = tmp_path / cifar10.FOLDER
    _official_sums_of(monkeypatch, folder)
    marker = tmp_path / "owned"
    real = cifar10.unpickle_batch

    def swap_then_unpickle(data: bytes, *, source: str):
        Path(source).write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2))
        return real(data, source=source)

    monkeypatch.setattr(cifar10, "unpickle_batch", swap_then_unpickle)
    x, y = load_cifar10(tmp_path, train=True)
    assert np.array_equal(x, _expected(batches, BATCHES[:5])[0]) and not marker.exists()
    monkeypatch.setattr(cifar10, "unpickle_batch", real)
    with pytest.raises(StageError, match="corrupted"):  # the swapped files fail their check on the next read
        load_cifar10(tmp_path, train=True)


# ------------------------------------------------------------------------------------------------ missing, malformed


def test_missing_files_say_what_to_fetch_and_where_in_one_line(tmp_path):
    _write_folder(tmp_path, py2_pickle)
    (tmp_path / cifar10.FOLDER / "data_batch_4").unlink()
    with pytest.raises(StageError) as e:
        load_cifar10(tmp_path, train=True, verify_checksums=False)
    msg = str(e.value)
    assert "\n" not in msg and cifar10.URL in msg and "data_batch_4" in msg
    assert str(tmp_path / cifar10.FOLDER / "data_batch_1") in msg
    load_cifar10(tmp_path, train=False, verify_checksums=False)  # the test split is complete


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(StageError, match="could not be fetched") as e:
        load_cifar10(tmp_path, train=True, download=True)
    assert "\n" not in str(e.value) and cifar10.URL in str(e.value)


def test_download_fetches_the_official_tarball_then_reads_it(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append((url, filename, md5))
        _write_folder(Path(download_root), py2_pickle)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    x, _ = load_cifar10(tmp_path, train=False, download=True, verify_checksums=False)
    assert calls == [(cifar10.URL, cifar10.ARCHIVE, cifar10.ARCHIVE_MD5)] and x.shape == (3, 32, 32, 3)
    load_cifar10(tmp_path, train=True, download=True, verify_checksums=False)
    assert len(calls) == 1  # present files are not fetched again


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.pop("labels"), "'labels'"),
        (lambda b: b.update(labels=b["labels"][:-1]), "'labels'"),
        (lambda b: b.update(labels=[10] * len(b["labels"])), "'labels'"),
        (lambda b: b.update(data=b["data"][:, :100].copy()), "'data'"),
        (lambda b: b.update(data="not an array"), "'data'"),
    ],
)
def test_malformed_batches_are_refused(tmp_path, change, message):
    batch = _batch(np.random.default_rng(0), 3, "x")
    change(batch)
    with pytest.raises(StageError, match=message):
        unpickle_batch(py2_pickle(batch), source="x")


def test_truncated_and_non_pickle_files_are_refused():
    good = py2_pickle(_batch(np.random.default_rng(0), 3, "x"))
    for data in (good[: len(good) // 2], b"PK\x03\x04 a zip file", b""):
        with pytest.raises(StageError, match="not a readable CIFAR-10 batch"):
            unpickle_batch(data, source="x")


def test_oversized_file_is_refused_with_a_bounded_read(tmp_path, monkeypatch):
    _write_folder(tmp_path, py2_pickle)
    size = (tmp_path / cifar10.FOLDER / "test_batch").stat().st_size
    monkeypatch.setattr(cifar10, "MAX_FILE_BYTES", size - 1)  # the real bound is 128 MiB; the logic is the same
    with pytest.raises(StageError, match="far more than a batch"):
        load_cifar10(tmp_path, train=False, verify_checksums=False)
    monkeypatch.setattr(cifar10, "MAX_FILE_BYTES", size)
    load_cifar10(tmp_path, train=False, verify_checksums=False)  # exactly at the bound: read


# ------------------------------------------------------------------------------------------------ hostile pickles


class _RunsCommand:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Evals:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        import builtins

        return builtins.eval, (self.code,)


class _Execs:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        import builtins

        return builtins.exec, (self.code,)


class _Popen:
    def __init__(self, argv: list[str]):
        self.argv = argv

    def __reduce__(self):
        return subprocess.check_call, (self.argv,)


class _Reduce:
    """Any callable with any arguments, pickled as numpy/pickle would reference it."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _valid_with(**fields) -> dict:
    batch = _batch(np.random.default_rng(0), 3, "x")
    batch.update(fields)
    return batch


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2),
        "builtins.eval": pickle.dumps(_Evals(touch), protocol=2),
        "builtins.exec": pickle.dumps(_Execs(touch), protocol=4),
        "subprocess.check_call": pickle.dumps(_Popen(["touch", str(marker)]), protocol=2),
        # protocol 0's INST opcode: module, name and arguments as text
        "INST os.system": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        # the payload hidden inside an otherwise valid batch
        "os.system in labels": pickle.dumps(_valid_with(labels=[0, 1, _RunsCommand(f"touch {marker}")]),
                                            protocol=2),
        "os.system in a filename": py2_pickle(_valid_with(
            filenames=["a.png", _Raw(pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)[2:-1])])),
    }


@pytest.mark.parametrize("kind", list(_payloads(Path("m"))))
def test_hostile_pickles_are_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "owned"
    payload = _payloads(marker)[kind]
    # The payload is live: the stock unpickler runs it (in a child, so nothing leaks into this process).
    stock = "import pickle, sys; pickle.loads(sys.stdin.buffer.read(), encoding='latin1')"
    child = subprocess.run([sys.executable, "-c", stock], input=payload, capture_output=True, cwd=tmp_path)
    assert marker.exists(), (kind, child.stderr.decode()[-500:])
    marker.unlink()

    _write_folder(tmp_path / "data", py2_pickle)
    target = tmp_path / "data" / cifar10.FOLDER / "data_batch_2"
    target.write_bytes(payload)
    with pytest.raises(StageError) as e:
        load_cifar10(tmp_path / "data", train=True, verify_checksums=False)
    msg = str(e.value)
    assert str(target) in msg and "is not a CIFAR-10 batch" in msg and "refused" in msg and "\n" not in msg
    named = {"INST os.system": "os.system", "os.system in labels": "system", "os.system in a filename": "system"}
    assert named.get(kind, kind.split()[0]).split(".")[-1] in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        # an object array: its elements would be arbitrary pickled objects
        (lambda: pickle.dumps(_valid_with(data=np.array([[1, 2]], dtype=object)), protocol=2), "dtype"),
        (lambda: pickle.dumps(_valid_with(data=np.zeros((3, 3072), dtype=np.int64)), protocol=2), "dtype"),
        # a uint8 dtype whose pickled state claims it holds Python objects (numpy itself would accept this
        # state and then read pixel bytes as object pointers)
        (lambda: pickle.dumps(_Reduce(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 9)),
                              protocol=2), "dtype's state"),
        # numpy callables outside the uint8-array path
        (lambda: pickle.dumps(_Reduce(np.load, ("/etc/passwd",)), protocol=2), "numpy.load"),
        (lambda: pickle.dumps(_Reduce(np.frombuffer, (b"\0" * 8, "u1")), protocol=2), "frombuffer"),
        (lambda: pickle.dumps(_valid_with(data=np.zeros((3, 3072), np.uint8)), protocol=5), "_frombuffer"),
        # the allowed names with arguments numpy never writes
        (lambda: pickle.dumps(_Reduce(_numpy_reconstruct(), (np.ndarray, (10 ** 12,), b"b")), protocol=2),
         "_reconstruct"),
        (lambda: pickle.dumps(_Reduce(codecs.encode, ("x" * 100, "zlib_codec")), protocol=2), "zlib"),
        (lambda: pickle.dumps(_Reduce(pickle.loads, (b"",)), protocol=2), "pickle"),
    ],
)
def test_numpy_and_codec_abuse_is_refused(payload, message):
    with pytest.raises(StageError, match="is not a CIFAR-10 batch") as e:
        unpickle_batch(payload(), source="x")
    assert message in str(e.value)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def test_persistent_ids_are_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if obj == "ref" else None

    import io

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"data": "ref"})
    with pytest.raises(StageError, match="persistent id"):
        unpickle_batch(buf.getvalue(), source="x")


def test_extension_codes_are_refused_even_when_cached(tmp_path):
    """A global named by a copyreg extension code, once resolved by any unpickler in the process, comes from a
    process-wide cache without `find_class`: the reader refuses the opcode itself."""
    import copyreg

    marker = tmp_path / "owned"
    cmd = f"touch {marker}".encode()
    payload = b"\x80\x02\x82\xf0C" + bytes([len(cmd)]) + cmd + b"\x85R."  # EXT1 240, (cmd,), REDUCE
    copyreg.add_extension("posix", "system", 240)
    try:
        assert pickle.loads(b"\x80\x02\x82\xf0.") is os.system  # now cached process-wide
        with pytest.raises(StageError, match="EXT1.*refused"):
            unpickle_batch(payload, source="x")
        assert not marker.exists()
    finally:
        copyreg.remove_extension("posix", "system", 240)

