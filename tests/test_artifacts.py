"""Checkpoint files are atomic and byte-reproducible: equal tensors give equal files (and equal SHA-256s in
every metrics record that names them)."""

from __future__ import annotations

import hashlib

import torch

from sferd.util.artifacts import torch_load, torch_save


def test_equal_objects_give_identical_files(tmp_path):
    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"a": 1}}
    torch_save(tmp_path / "a/model.pt", obj)
    first = (tmp_path / "a/model.pt").read_bytes()
    torch_save(tmp_path / "a/model.pt", obj)  # overwrite: same bytes again
    assert (tmp_path / "a/model.pt").read_bytes() == first
    torch_save(tmp_path / "b/model.pt", obj)  # another folder, same file name: same bytes
    assert hashlib.sha256((tmp_path / "b/model.pt").read_bytes()).hexdigest() == hashlib.sha256(first).hexdigest()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.pt"]  # no temporary leftovers
    assert torch.equal(torch_load(tmp_path / "a/model.pt")["state_dict"]["w"], obj["state_dict"]["w"])
