"""The resumable training loop: a killed stage resumes to exactly the uninterrupted result."""

import pytest
import torch

from sferd.methods.training import EMA, linear_to_zero, train_loop, warmup_constant
from sferd.util.errors import StageError


class Killed(Exception):
    pass


def _run(tmp_path, *, kill_at=None, config=None, updates=40, nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    ema = EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def loss_fn(step):
        if kill_at is not None and step == kill_at:
            raise Killed()
        x = torch.randn(16, 4, generator=gen)
        loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
        return loss * float("nan") if nan_at is not None and step == nan_at else loss

    summary = train_loop(
        label="t", model=model, optimizer=opt, lr_lambda=linear_to_zero(updates), loss_fn=loss_fn, updates=updates,
        grad_clip_norm=1.0, state_path=tmp_path / "state.pt", config=config or {"a": 1}, checkpoint_every=10,
        rng_objects={"data": gen}, ema=ema,
    )
    return model, ema, summary


def test_resume_after_kill_gives_identical_weights(tmp_path):
    ref_model, ref_ema, ref_summary = _run(tmp_path / "ref")
    with pytest.raises(Killed):
        _run(tmp_path / "run", kill_at=25)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 20
    model, ema, summary = _run(tmp_path / "run")
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref_ema.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)
    assert summary == ref_summary


def test_state_of_other_config_is_not_resumed(tmp_path):
    with pytest.raises(Killed):
        _run(tmp_path, kill_at=25, config={"a": 1})
    ref, _, _ = _run(tmp_path / "fresh", config={"a": 2})
    model, _, _ = _run(tmp_path, config={"a": 2})
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_loss_fails_clearly_and_keeps_last_state(tmp_path):
    with pytest.raises(StageError, match="non-finite loss"):
        _run(tmp_path, nan_at=15)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 10


def test_lr_schedules():
    w = warmup_constant(10)
    assert w(0) == pytest.approx(0.1) and w(9) == 1.0 and w(100) == 1.0
    d = linear_to_zero(100)
    assert d(0) == 1.0 and d(50) == pytest.approx(0.5) and d(100) == 0.0
