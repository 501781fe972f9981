"""Tests that need CUDA (marked `gpu`: deselected by default, skipped without a GPU; a GPU owner runs them with
`pytest -m gpu tests/test_gpu.py`).

* CUDA vs CPU: the U-Net's forward output and every parameter gradient agree within a relative L2 error of 1e-4
  in fp32 with TF32 off (different kernels sum in different orders; 1e-4 is ~1000 fp32 ulps of accumulated
  rounding over a few dozen layers, far below any real bug, which shows as O(1)).
* bf16 autocast: finite loss within 5 % of the fp32 loss, fp32 master weights and fp32 finite gradients, and an
  Adam step that keeps the weights fp32.
* FID sharding over nccl (≥ 2 GPUs): the FID stage under `torchrun --nproc_per_node 2` writes samples.npz
  byte-identical to one process on one GPU (tests/test_shard.py's gloo test, on GPUs).
* plan's memory estimate against the CUDA allocator: saved activations within 25 %, the training peak within
  [0.8, 1.5]× of the estimate (the estimate leaves out backward transients and allocator rounding).
* bench/train_throughput.py runs the real table1 U-Net for a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sferd.nn.build import build_unet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"in_channels": 3, "out_channels": 6, "resolution": 32, "base_channels": 64, "channel_mult": [1, 2, 2],
         "num_res_blocks": 2, "attention_resolutions": [16, 8], "num_heads": 1, "head_channels": 32,
         "dropout": 0.0, "num_classes": 10, "norm_groups": 32}
PARITY_RTOL = 1e-4


@pytest.fixture
def no_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _net(seed: int = 0):
    torch.manual_seed(seed)
    net = build_unet(MODEL)
    with torch.no_grad():  # zero-initialised residual branches and output would hide most of the network
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    r = MODEL["resolution"]
    return (torch.randn(batch, 3, r, r, generator=g), torch.rand(batch, generator=g),
            torch.randint(MODEL["num_classes"], (batch,), generator=g))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_cuda_matches_cpu_forward_and_backward(no_tf32):
    x, u, y = _inputs()
    outs, grads = {}, {}
    for dev in ("cpu", "cuda"):
        net = _net().to(dev)
        out = net(x.to(dev), u.to(dev), y.to(dev))
        out.square().mean().backward()
        outs[dev] = out.detach().cpu()
        grads[dev] = {k: p.grad.detach().cpu() for k, p in net.named_parameters()}
    assert _rel(outs["cuda"], outs["cpu"]) < PARITY_RTOL
    worst = max(grads["cpu"], key=lambda k: _rel(grads["cuda"][k], grads["cpu"][k]))
    assert _rel(grads["cuda"][worst], grads["cpu"][worst]) < PARITY_RTOL, worst


def test_bf16_autocast_keeps_fp32_masters_and_finite_gradients():
    x, u, y = (t.cuda() for t in _inputs())
    target = torch.randn(x.shape[0], MODEL["out_channels"], 32, 32, device="cuda")
    losses = {}
    for precision in ("fp32", "bf16"):
        net = _net().cuda()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x, u, y)
        if precision == "bf16":
            assert out.dtype == torch.bfloat16  # the autocast path was really taken
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        losses[precision] = loss.item()
        assert torch.isfinite(loss)
        for name, p in net.named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
        opt.step()
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.05 * abs(losses["fp32"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fid_sharding_over_nccl_is_byte_identical(tmp_path, monkeypatch):
    from test_shard import _torchrun, _two_fid_stages

    from sferd.pipeline.run import main

    monkeypatch.chdir(tmp_path)
    _two_fid_stages(tmp_path)
    assert main(["one"]) == 0  # one process, cuda:0
    r = _torchrun(tmp_path, "-m", "sferd.pipeline.run", "two")  # 2 processes: cuda:0, cuda:1, nccl
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = (tmp_path / f"results/{s}/samples.npz" for s in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    m1, m2 = (json.loads((tmp_path / f"results/metrics/{s}.json").read_text()) for s in ("one", "two"))
    assert m2["machine"]["device_type"] == "cuda" and m2["machine"]["world_size"] == 2
    assert m1["fid"] == m2["fid"]


def test_memory_estimate_against_the_cuda_allocator():
    from sferd.nn.memory import activations, training_memory

    batch = 16
    x, u, y = (t.cuda() for t in _inputs(batch))
    net = _net().cuda()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    # one full step first, so Adam's moments exist (they are part of the states the estimate counts)
    net(x, u, y).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = net(x, u, y)
    saved = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    act = activations(MODEL, "fp32")
    estimate = act.fixed + batch * act.per_sample
    assert 0.75 < saved / estimate < 1.25, (saved, estimate)
    torch.cuda.reset_peak_memory_stats()
    out.square().mean().backward()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # EMA is not kept here: add its 4 B per parameter to what was measured
    peak += 4 * sum(p.numel() for p in net.parameters())
    total = training_memory(MODEL, batch, "fp32").total
    assert 0.8 < peak / total < 1.5, (peak, total)


def test_train_throughput_runs_the_table1_unet():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "bench/train_throughput.py", "--spec", "specs/table1.yaml", "--steps", "3",
                        "--warmup", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TINY" not in r.stdout and "peak memory (measured)" in r.stdout and "TFLOP/s achieved" in r.stdout
    assert np.isfinite(float(r.stdout.split("throughput: ")[1].split(" images/s")[0]))
