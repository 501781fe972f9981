"""CIFAR-10 through torchvision's loader (the official python pickles, `cifar-10-batches-py/`).

torchvision reads the batches and checks their md5 sums. The checksum check can be switched off
(`verify_checksums: false`) so that the tests can load small files written in the same pickle format through
this very code; real runs keep it on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sferd.util.errors import StageError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"


def _dataset_class(verify_checksums: bool):
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        """torchvision's reader, with file presence instead of md5 sums (test files are not the real ones)."""

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # class names are not needed; skip the meta file's md5 as well
            self.classes, self.class_to_idx = [], {}

    return UncheckedCIFAR10


def load_cifar10(data_dir: str | Path, *, train: bool, download: bool = False, verify_checksums: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels N int64) of the training or the test split."""
    root = Path(data_dir)
    cls = _dataset_class(verify_checksums)
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as e:
        raise StageError(
            f"CIFAR-10 not found or corrupted under {root} ({e}). Download {URL} and extract it there, so that "
            f"{root / FOLDER / 'data_batch_1'} exists, or set `dataset.source.download: true` on a connected machine"
        ) from None
    except OSError as e:  # e.g. no network with download: true
        raise StageError(f"CIFAR-10 could not be fetched into {root} ({e}); download {URL} by hand and extract it there") from None
    images = np.ascontiguousarray(ds.data, dtype=np.uint8)
    labels = np.asarray(ds.targets, dtype=np.int64)
    if images.shape[1:] != (32, 32, 3):
        raise StageError(f"CIFAR-10 under {root} has images of shape {images.shape[1:]}, expected 32×32×3")
    return images, labels
