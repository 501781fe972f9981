"""The training engine: resume, corrupt-state fallback, numerics guard, gradient accumulation, per-sample draws."""

import numpy as np
import pytest
import torch

from sferd.methods.checkpoints import CheckpointStore, resume_key
from sferd.methods.draws import SampleDraws, sample_seed
from sferd.methods.training import EMA, ImageSource, Session, linear_to_zero, warmup_constant
from sferd.nn.dropout import SampleDropout, keyed_uniform, sample_keys
from sferd.util.distributed import Launch
from sferd.util.errors import StageError
from sferd.util.runtime import Runtime

pytestmark = pytest.mark.usefixtures("single_thread")


class Killed(Exception):
    pass


class Split:
    """A tiny in-memory split with the store's interface (gather, labels, len)."""

    def __init__(self, n=40, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)
        self.labels = rng.integers(0, 3, size=n).astype(np.int64)

    def __len__(self):
        return len(self.images)

    def gather(self, idx):
        return self.images[idx]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), SampleDropout(0.2), torch.nn.Linear(8, 16))


def _run(tmp_path, *, kill_at=None, nan_at=None, params=None, micro=None, updates=30, every=10, batch=12,
         workers=0, compile=False):
    params = params or {"seed": 3, "training": {"lr": 1e-2, "checkpoint_every_updates": every}}
    net = _net()
    ema = EMA(net, 0.9)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.calls = 0

        def forward(self, batch):
            step = self.calls // max(1, -(-batch_size_ // (micro or batch_size_)))
            self.calls += 1
            if kill_at is not None and step == kill_at:
                raise Killed()
            noise = batch.draws.randn(16)
            out = self.net(batch.x0 + 0.1 * noise.view_as(batch.x0))
            loss = (out - batch.x0.flatten(1)).pow(2).mean(1)
            return loss * float("nan") if nan_at is not None and step == nan_at else loss

    batch_size_ = batch
    with Session("t", params, proc=Launch(), runtime=Runtime(micro_batch=micro, loader_workers=workers, compile=compile), root=tmp_path) as s:
        opt = s.adam(net.parameters(), lr=1e-2)
        summary = s.train(module=Loss(), trainable=net, optimizer=opt, ema=ema,
                          source=ImageSource(Split(), seed=3, flip=True, conditional=False), batch_size=batch,
                          updates=updates, lr_lambda=linear_to_zero(updates), grad_clip_norm=1.0,
                          checkpoint_every=params["training"]["checkpoint_every_updates"], seed=3, stream=7,
                          log_path=str(tmp_path / "log.tsv"))
    return net, ema, summary


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_after_kill_gives_identical_weights(tmp_path):
    ref, ref_ema, ref_summary = _run(tmp_path / "ref")
    with pytest.raises(Killed):
        _run(tmp_path / "run", kill_at=25)
    store = CheckpointStore("t", tmp_path / "run")
    assert store.steps() == [20, 10]  # the newest two
    net, ema, summary = _run(tmp_path / "run")
    assert _equal(ref, net) and _equal(ref_ema.model, ema.model)
    assert summary == ref_summary
    assert store.steps() == []  # a finished stage leaves no scratch state
    log = (tmp_path / "run" / "log.tsv").read_text().splitlines()
    assert log[0].split("\t") == ["update", "loss", "grad_norm", "lr", "images_per_s"] and len(log) == 31


def test_corrupt_newest_state_falls_back_to_the_previous(tmp_path, capsys):
    ref, _, _ = _run(tmp_path / "ref")
    with pytest.raises(Killed):
        _run(tmp_path / "run", kill_at=25)
    store = CheckpointStore("t", tmp_path / "run")
    newest = store.path(20)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a state cut to half its size
    net, _, _ = _run(tmp_path / "run")
    err = capsys.readouterr().err
    assert "state-0000000020.pt is unreadable" in err and "resuming at update 10/30" in err
    assert "Traceback" not in err
    assert _equal(ref, net)


def test_checkpoint_interval_is_not_part_of_the_resume_key(tmp_path, capsys):
    with pytest.raises(Killed):
        _run(tmp_path, kill_at=25)
    p = {"seed": 3, "training": {"lr": 1e-2, "checkpoint_every_updates": 7}}
    assert resume_key(p) == resume_key({"seed": 3, "training": {"lr": 1e-2, "checkpoint_every_updates": 10}})
    assert resume_key(p) != resume_key({"seed": 4, "training": {"lr": 1e-2, "checkpoint_every_updates": 7}})
    ref, _, _ = _run(tmp_path / "ref")
    net, _, _ = _run(tmp_path, params=p)
    assert "resuming at update 20/30" in capsys.readouterr().err
    assert _equal(ref, net)


def test_state_of_other_params_is_not_resumed(tmp_path, capsys):
    with pytest.raises(Killed):
        _run(tmp_path, kill_at=25)
    other = {"seed": 4, "training": {"lr": 1e-2, "checkpoint_every_updates": 10}}
    fresh, _, _ = _run(tmp_path / "fresh", params=other)
    net, _, _ = _run(tmp_path, params=other)
    assert "another config" in capsys.readouterr().err
    assert _equal(fresh, net)


def test_non_finite_loss_stops_naming_the_update_and_keeps_the_last_good_state(tmp_path):
    with pytest.raises(StageError, match=r"non-finite loss .* at update 15; the last good state \(update 10\)"):
        _run(tmp_path, nan_at=15)
    assert CheckpointStore("t", tmp_path).steps() == [10]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """micro-batches of 5 (5 + 5 + 2) vs one batch of 12: the same samples, the same draws, equal weights up to
    float summation order."""
    whole, _, _ = _run(tmp_path / "whole", updates=8)
    acc, _, _ = _run(tmp_path / "acc", updates=8, micro=5)
    for a, b in zip(whole.state_dict().values(), acc.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not _equal(whole, _run(tmp_path / "other", updates=8, batch=11)[0])  # the check can fail


def test_gradient_accumulation_gives_equal_gradients():
    """One backward over 12 samples vs three accumulated micro-batches with the engine's W/B scaling."""
    net = _net().train()
    x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    keys = SampleDraws(1, 2, range(12)).randint(0, 2**31)

    def grads(chunks):
        net.zero_grad()
        for c in chunks:
            with sample_keys(keys[c]):
                per = (net(x[c]) - x[c].flatten(1)).pow(2).mean(1)
            (per.sum() / 12).backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(grads([slice(0, 12)]), grads([slice(0, 5), slice(5, 10), slice(10, 12)])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_sample_draws_do_not_depend_on_the_split():
    whole = SampleDraws(5, 9, range(100, 110))
    parts = [SampleDraws(5, 9, range(100, 104)), SampleDraws(5, 9, range(104, 110))]
    a = (whole.randint(0, 1000), whole.rand(), whole.randn(3, 2))
    b = [(p.randint(0, 1000), p.rand(), p.randn(3, 2)) for p in parts]
    for k in range(3):
        assert torch.equal(a[k], torch.cat([b[0][k], b[1][k]]))
    assert len({sample_seed(5, 9, g) for g in range(10_000)}) == 10_000
    assert sample_seed(5, 9, 1) != sample_seed(5, 10, 1) != sample_seed(6, 9, 1)


def test_keyed_dropout_masks_do_not_depend_on_the_batch_split():
    keys = torch.tensor([3, 99, 2**31 - 1, 0])
    whole = keyed_uniform(keys, 4, (8, 5, 5))
    assert torch.equal(whole, torch.cat([keyed_uniform(keys[:1], 4, (8, 5, 5)), keyed_uniform(keys[1:], 4, (8, 5, 5))]))
    assert not torch.equal(whole, keyed_uniform(keys, 5, (8, 5, 5)))  # another layer, another mask
    u = keyed_uniform(torch.arange(64), 0, (32, 32)).flatten()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float((u < 0.2).float().mean()) - 0.2) < 0.01  # the drop rate is p
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_sample_dropout_keeps_expectation_and_is_identity_in_eval():
    d = SampleDropout(0.25)
    x = torch.ones(16, 4, 8, 8)
    with sample_keys(torch.arange(16)):
        y = d.train()(x)
    assert set(torch.unique(y).tolist()) <= {0.0, float(torch.tensor(1 / 0.75))}
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert torch.equal(d.eval()(x), x)


def test_lr_schedules():
    w = warmup_constant(10)
    assert w(0) == pytest.approx(0.1) and w(9) == 1.0 and w(100) == 1.0
    d = linear_to_zero(100)
    assert d(0) == 1.0 and d(50) == pytest.approx(0.5) and d(100) == 0.0


def test_bf16_autocast_trains_with_float32_master_weights(tmp_path):
    """precision: bf16 runs the forward under bf16 autocast (the result differs from fp32) while the weights, the
    optimiser state and the EMA stay float32."""
    p32 = {"seed": 3, "precision": "fp32", "training": {"lr": 1e-2, "checkpoint_every_updates": 10}}
    p16 = {**p32, "precision": "bf16"}
    a, _, sa = _run(tmp_path / "fp32", params=p32, updates=6)
    b, ema, sb = _run(tmp_path / "bf16", params=p16, updates=6)
    assert all(p.dtype == torch.float32 for p in b.parameters()) and all(
        p.dtype == torch.float32 for p in ema.model.parameters())
    assert np.isfinite(sb["loss_mean_recent"]) and not _equal(a, b)
    # close, though: bf16 keeps ~3 significant digits of each activation
    worst = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert worst < 0.05


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(StageError, match="precision 'fp16'"):
        Session("t", {"precision": "fp16"}, proc=Launch(), runtime=Runtime(), root=tmp_path)


def test_loader_workers_prefetch_the_same_batches(tmp_path):
    """DataLoader workers only move the gather off the training process: the weights are bitwise the same."""
    a, _, _ = _run(tmp_path / "w0", updates=8)
    b, _, _ = _run(tmp_path / "w2", updates=8, workers=2)
    assert _equal(a, b)


@pytest.mark.slow  # inductor compiles C++ kernels: about a minute on 2 cores
def test_torch_compile_trains_the_same_weights_within_tolerance(tmp_path):
    a, _, _ = _run(tmp_path / "eager", updates=4)
    b, _, _ = _run(tmp_path / "compiled", updates=4, compile=True)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_resume_key_covers_the_content_of_the_inputs(tmp_path):
    """A halving killed mid-way must not resume against a teacher retrained in between (same params, other bytes)."""
    from sferd.methods.checkpoints import input_fingerprints

    (tmp_path / "t").mkdir()
    (tmp_path / "t/model.pt").write_bytes(b"teacher v1")
    (tmp_path / "split").mkdir()
    (tmp_path / "split/images.npy").write_bytes(b"images")
    params = {"seed": 0, "teacher": {"checkpoint": "t/model.pt"}, "inputs": {"train": "split"},
              "outputs": {"dir": "out"}}
    first = input_fingerprints(params, tmp_path)
    assert set(first) == {"t/model.pt", "split/images.npy"}
    (tmp_path / "t/model.pt").write_bytes(b"teacher v2")
    second = input_fingerprints(params, tmp_path)
    assert resume_key(params, first) != resume_key(params, second)
    assert resume_key(params, second) == resume_key(params, input_fingerprints(params, tmp_path))


def test_a_corrupt_state_is_set_aside_so_two_good_ones_remain(tmp_path):
    with pytest.raises(Killed):
        _run(tmp_path, kill_at=25)
    store = CheckpointStore("t", tmp_path)
    store.path(20).write_bytes(b"not a state")
    assert store.load_latest(resume_key({"seed": 3, "training": {"lr": 1e-2, "checkpoint_every_updates": 10}})) \
        is not None
    assert store.steps() == [10] and (store.dir / "state-0000000020.pt.corrupt").is_file()


def test_a_second_run_of_the_same_stage_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = CheckpointStore("t", tmp_path)
    first.lock()
    try:
        with pytest.raises(StageError, match="another run of stage t holds"):
            CheckpointStore("t", tmp_path).lock()
    finally:
        first.unlock()
    CheckpointStore("t", tmp_path).lock()  # free again
