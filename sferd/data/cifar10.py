"""CIFAR-10 (Krizhevsky 2009), the dataset of the SFERD paper's Table 1, from the official python batches
(`cifar-10-batches-py/`, the tarball torchvision downloads).

The batches are Python-2 pickles: a dict with `data` (a uint8 numpy array, N × 3072, planes R, G, B) and
`labels` (a list of ints), plus `batch_label` and `filenames` (strings). Unpickling runs whatever callables a file
names, and `data_dir` is user-given, so no file here ever reaches the stock unpickler:

- `_CifarUnpickler.find_class` admits exactly the globals a pickled numpy uint8 array names (`_reconstruct`,
  `ndarray`, `dtype`, under numpy 1.x's and 2.x's module paths) and `_codecs.encode`, which Python 3 writes for
  every bytes object at pickle protocol 2 (how a batch re-pickled by Python 3, e.g. a test's, stores the array's
  buffer). What it returns are stand-ins, not numpy's callables: they accept only the canonical uint8 form and
  build the array from the raw bytes themselves, so no pickled state reaches numpy internals. Every other global
  is refused by name before anything runs.
- With `verify_checksums` (the default) each file is read once, its md5 checked against the official sum, and
  those very bytes are unpickled (no gap between the check and the load for the file to change in).
- The result is checked for the format's shapes and types before it is used.

`verify_checksums: false` exists so tests can load small files written in the real format through this code;
real runs keep it on. torchvision is used only to download and extract the tarball (`download: true`).
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from sferd.util.errors import StageError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
# Official md5 sums of the extracted batches (the values torchvision's CIFAR10 checks; a test pins them to it).
TRAIN_FILES = (
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
)
TEST_FILES = (("test_batch", "40351d587109b95175f43aff81a1287e"),)
NUM_CLASSES = 10
PIXELS = 3 * 32 * 32
# A real batch is 31,035,704 bytes (10,000 images + names). The bound keeps a wrong file (a disk image, a device
# node behind a symlink) from being read whole into memory.
MAX_FILE_BYTES = 128 * 1024 * 1024


class RefusedPickle(pickle.UnpicklingError):
    """The file asks the unpickler for something a CIFAR-10 batch never contains; nothing of it was run."""


# numpy pickles a uint8 array as
#     _reconstruct(ndarray, (0,), b'b')                       -> an empty array, then BUILD with
#     (1, shape, dtype('u1', False, True) + BUILD (3, '|', None, None, None, -1, -1, 0), fortran, raw bytes)
# Neither numpy callable is handed to the stream: a pickled dtype state may set flags such as "holds Python
# objects" on a uint8 dtype (numpy accepts it), after which numpy would read the pixel bytes as object pointers.
# The stand-ins below accept exactly the canonical uint8 form and build the array from the raw bytes themselves.


class _NdarrayToken:
    """Stands for `numpy.ndarray`: only `_reconstruct` accepts it; no __dict__, so BUILD cannot mutate it."""

    __slots__ = ()


_NDARRAY = _NdarrayToken()
_UINT8_STATE = (3, "|", None, None, None, -1, -1, 0)


class _UInt8Descr:
    """Stands for `numpy.dtype('u1')` until its pickled state proves it is the plain uint8 dtype."""

    __slots__ = ("checked",)

    def __init__(self):
        self.checked = False

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and state == _UINT8_STATE):
            raise RefusedPickle(f"sets a uint8 dtype's state to {state!r}, not the plain uint8 state")
        self.checked = True


class _ArrayState:
    """Stands for the empty array `_reconstruct` returns; its BUILD state becomes a uint8 array of the file's bytes."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        ok = isinstance(state, tuple) and len(state) == 5 and state[0] == 1
        shape, descr, fortran, raw = state[1:] if ok else (None,) * 4
        ok = (ok and isinstance(shape, tuple) and 1 <= len(shape) <= 2
              and all(type(n) is int and n >= 0 for n in shape)
              and isinstance(descr, _UInt8Descr) and descr.checked
              and fortran in (0, 1) and isinstance(raw, (str, bytes)) and self.array is None)
        if not ok:
            raise RefusedPickle("holds an array state that is not a plain uint8 array's")
        # A Python-2 byte string read with encoding="latin1" is a str with one code point per byte.
        buf = raw.encode("latin-1") if isinstance(raw, str) else raw
        if len(buf) != math.prod(shape):
            raise RefusedPickle(f"holds a uint8 array of shape {shape} with {len(buf)} bytes of data")
        self.array = np.frombuffer(buf, dtype=np.uint8).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,) or typecode not in ("b", b"b"):
        raise RefusedPickle(f"calls numpy _reconstruct{(cls, shape, typecode)!r}, not as numpy pickles an array")
    return _ArrayState()


def _dtype(spec, align=False, copy=True):
    # The batches hold only uint8 arrays; every other dtype (above all object arrays, whose elements are arbitrary
    # pickled objects) is refused.
    if spec not in ("u1", b"u1") or align not in (0, 1) or copy not in (0, 1):
        raise RefusedPickle(f"asks for numpy dtype{(spec, align, copy)!r}; a CIFAR-10 batch holds only uint8 arrays")
    return _UInt8Descr()


def _latin1_encode(text, encoding="utf-8"):
    # Python 3 writes bytes at protocol <= 2 as `_codecs.encode(text, 'latin1')`; other codecs (zlib, bz2, …)
    # could inflate a small file into gigabytes, so only the one Python itself uses is admitted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"calls _codecs.encode(…, {encoding!r}); only latin-1 text → bytes occurs in a batch")
    return text.encode("latin-1")


_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy >= 2
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the official files)
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches: every global the stream names goes through `find_class` (GLOBAL,
    STACK_GLOBAL, INST, OBJ and extension codes alike), and only the stand-ins above come back from it."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refers to {module}.{name}, which a CIFAR-10 batch never contains (only uint8 numpy arrays, "
                f"lists, ints and strings); refused without running it"
            ) from None

    def persistent_load(self, pid):
        raise RefusedPickle("uses a persistent id, which a CIFAR-10 batch never contains; refused")


def _refuse_extension_codes(data: bytes) -> None:
    """The EXT1/2/4 opcodes name a global by a copyreg extension code. Once any unpickler in the process has
    resolved a code, both CPython unpicklers take it from copyreg's process-wide cache without calling
    `find_class`, so the allowlist would not see it. The official batches never use them: refuse before loading."""
    for op, _, pos in pickletools.genops(data):
        if op.name in ("EXT1", "EXT2", "EXT4"):
            raise RefusedPickle(f"uses the extension-registry opcode {op.name} (byte {pos}), which a CIFAR-10 batch "
                                f"never contains and which bypasses the allowed globals; refused without running it")


def unpickle_batch(data: bytes, *, source: str) -> dict:
    """The dict of one batch from its bytes, through the restricted unpickler; StageError if refused or malformed.

    encoding="latin1" as numpy documents for Python-2 pickles: py2 strings (keys, and the arrays' raw buffers)
    become str with one code point per byte, which `_ArrayState` turns back into the same bytes.
    """
    try:
        _refuse_extension_codes(data)
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedPickle as e:
        raise StageError(f"{source} is not a CIFAR-10 batch: it {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed streams raise many types; all mean "not a batch"
        detail = (str(e).splitlines() or [""])[0][:200]  # one line, bounded: the message echoes file content
        raise StageError(f"{source} is not a readable CIFAR-10 batch ({type(e).__name__}: {detail})") from None
    return _checked_batch(obj, source)


def _checked_batch(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise StageError(f"{source} is not a CIFAR-10 batch: it holds a {type(obj).__name__}, not a dict")
    # Python 2 wrote the keys as byte strings; read with latin-1 they are str, a Python 3 re-pickle may keep bytes.
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if isinstance(data, _ArrayState):  # the only way an array comes out of the restricted unpickler
        data = batch["data"] = data.array
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == PIXELS):
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise StageError(f"{source} is not a CIFAR-10 batch: 'data' should be a uint8 N×{PIXELS} array, is {what}")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(v) is int and 0 <= v < NUM_CLASSES for v in labels)):
        raise StageError(f"{source} is not a CIFAR-10 batch: 'labels' should be {len(data)} ints in 0..9")
    return batch


def _read_file(path: Path, md5: str | None, root: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows while it is read
    if len(data) > MAX_FILE_BYTES:
        raise StageError(f"CIFAR-10 not found or corrupted under {root}: {path} has more than {MAX_FILE_BYTES} "
                         f"bytes, far more than a batch (about 31 MB); extract {URL} there afresh")
    if md5 is not None:
        got = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if got != md5:
            raise StageError(
                f"CIFAR-10 not found or corrupted under {root}: {path.name} has md5 {got}, the official file {md5}; "
                f"extract {URL} there afresh (or set `dataset.source.verify_checksums: false` for test files)"
            )
    return data


def _download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a corrupt download
        raise StageError(f"CIFAR-10 could not be fetched into {root} ({e}); download {URL} by hand and extract it "
                         f"there") from None


def load_cifar10(data_dir: str | Path, *, train: bool, download: bool = False,
                 verify_checksums: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels N int64) of the training (data_batch_1..5) or the test split."""
    root = Path(data_dir)
    files = TRAIN_FILES if train else TEST_FILES
    folder = root / FOLDER
    if download and not all((folder / name).is_file() for name, _ in files):
        _download(root)
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise StageError(
            f"CIFAR-10 not found under {root} (missing {', '.join(missing)}): download {URL} and extract it there, "
            f"so that {folder / files[0][0]} exists, or set `dataset.source.download: true` on a connected machine"
        )
    images, labels = [], []
    for name, md5 in files:
        path = folder / name
        batch = unpickle_batch(_read_file(path, md5 if verify_checksums else None, root), source=str(path))
        # planar rows (R plane, G plane, B plane, each 32 rows of 32) → N×32×32×3
        images.append(batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images), dtype=np.uint8), np.concatenate(labels)
