"""The per-GPU memory estimate `plan` prints (sferd/nn/memory.py), checked where it can be checked without a GPU:
the fake-tensor forward saves exactly what a real forward saves, the per-image bytes are a straight line in the
batch, attention is counted as a fused kernel, bf16 follows the CUDA autocast policy, and the micro-batch is the
largest that fits. (tests/test_gpu.py compares the estimate with a real CUDA peak.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sferd.nn import memory
from sferd.nn.memory import GIB, HEADROOM, activation_bytes, saved_tensors, training_memory

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
# class-conditional, dropout, attention at 8×8 (N = 64 tokens) and in the middle block: every kind of layer
MODEL = {"in_channels": 3, "out_channels": 6, "resolution": 16, "base_channels": 16, "channel_mult": [1, 2],
         "num_res_blocks": 1, "attention_resolutions": [8], "num_heads": 2, "head_channels": None, "dropout": 0.1,
         "num_classes": 5, "norm_groups": 8}


def _structure(saved):
    """What was saved, in order, with which saved tensors share a storage (as first-occurrence indices)."""
    first: dict[int, int] = {}
    return [(s.shape, s.dtype, s.nbytes, s.is_parameter, first.setdefault(s.storage, i)) for i, s in enumerate(saved)]


def test_fake_forward_saves_exactly_what_a_real_cpu_forward_saves():
    fake = saved_tensors(MODEL, 3, device="cpu", fake=True)
    real = saved_tensors(MODEL, 3, device="cpu", fake=False)
    assert len(fake) == len(real) > 100
    assert _structure(fake) == _structure(real)
    assert activation_bytes(fake) == activation_bytes(real) > 0
    assert any(s.is_parameter for s in real) and any(s.dtype == "int64" for s in real)  # weights, class labels


def test_per_image_bytes_are_a_straight_line_in_the_batch():
    act = memory.activations(MODEL, "fp32")
    assert act.per_sample > 0
    for b in (1, 7):  # points other than the two the estimate was fitted on
        assert activation_bytes(saved_tensors(MODEL, b)) == act.fixed + b * act.per_sample


def test_attention_is_counted_as_the_fused_kernel_not_the_n_by_n_map():
    n = 8 * 8
    saved = saved_tensors(MODEL, 2)
    assert not [s for s in saved if len(s.shape) == 4 and s.shape[-2:] == (n, n)]
    assert [s for s in saved if s.shape == (2, 2, n)]  # the log-sum-exp the fused kernel keeps instead


def test_bf16_follows_cuda_autocast():
    saved = saved_tensors(MODEL, 2, precision="bf16")
    dtypes = {s.dtype for s in saved if not s.is_parameter}
    assert "bfloat16" in dtypes and "float32" in dtypes  # convolutions in bf16, group norm kept in fp32
    fp32, bf16 = memory.activations(MODEL, "fp32"), memory.activations(MODEL, "bf16")
    assert bf16.per_sample < fp32.per_sample
    assert bf16.fixed > 0  # autocast's cached bf16 copies of the weights, independent of the batch
    assert not torch.is_autocast_enabled("cuda")  # switched off again afterwards


def test_states_and_the_largest_micro_batch():
    m = training_memory(MODEL, 4096, "fp32", frozen=MODEL)
    p = sum(q.numel() for q in __import__("sferd.nn.build", fromlist=["x"]).build_unet(MODEL).parameters())
    assert m.trained_params == m.frozen_params == p and m.states == 24 * p
    gib = (m.states + m.activations.fixed + 100.5 * m.activations.per_sample) / HEADROOM / GIB
    micro = m.largest_micro_batch(gib)
    assert micro == 100
    assert m.bytes_at(micro) <= HEADROOM * gib * GIB < m.bytes_at(micro + 1)
    assert m.largest_micro_batch(1e-6) == 0 and m.largest_micro_batch(1e6) == 4096
    assert m.total == m.bytes_at(4096)


def test_plan_prints_memory_and_micro_batch(monkeypatch):
    from sferd.cli import app

    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    out = {}
    for gib in ("80", "10"):
        r = runner.invoke(app, ["plan", "specs/table1.yaml", "--gpu-memory-gib", gib])
        assert r.exit_code == 0, r.output
        out[gib] = r.stdout
    # table1 trains in bf16 (its `precision`): plan marks that column as the spec's
    lines = re.findall(r"^\s+mem: batch 128 on one GPU: fp32 ([\d,.]+) GiB, (.*?); bf16 \(spec\) ([\d,.]+) GiB, (.*) "
                       r"in 80 GiB$", out["80"], flags=re.M)
    n_training = len(re.findall(r"\[(teacher|distill)\]", out["80"]))
    assert n_training >= 2 and len(lines) == n_training, out["80"][:2000]
    teacher = lines[0]
    assert 5 < float(teacher[0].replace(",", "")) < 80 and teacher[1] == "fits whole"
    assert float(teacher[2].replace(",", "")) < float(teacher[0].replace(",", ""))
    assert re.search(r"fp32 [\d,.]+ GiB, micro-batch ≤ \d+ per GPU; bf16 \(spec\) .* in 10 GiB", out["10"])
    assert "mem: per-GPU memory of one training micro-batch, estimated without a GPU" in out["80"]
    assert "mem:" not in "".join(re.findall(r"^.*\[(?:data|fid|render)\].*\n\s+mem:.*$", out["80"], flags=re.M))
