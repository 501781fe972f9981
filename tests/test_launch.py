"""The stage launcher: in-process for one process, torchrun for several; its command lines, failures and signals.

The FID stage through the launcher at 2 processes (samples byte-identical to 1 process) is in test_shard.py;
through real `dvc repro` in test_launch_dvc.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sferd.pipeline import launch
from sferd.util.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS_KINDS = {"data", "reference", "render", "teacher_import"}


# ------------------------------------------------------------------------------------------------ command lines


def test_torchrun_args_one_node():
    assert launch.torchrun_args(8, 1, "stages/table1/params.json", "cifar10-teacher-s0008-fid") == [
        "--standalone", "--nproc_per_node", "8",
        "-m", "sferd.pipeline.run", "--params", "stages/table1/params.json", "cifar10-teacher-s0008-fid"]


def test_torchrun_args_several_nodes():
    got = launch.torchrun_args(8, 2, "params.json", "digits-teacher", rdzv_endpoint="node0:29400", rdzv_id="exp")
    assert got == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                   "node0:29400", "--rdzv_id", "exp-digits-teacher",
                   "-m", "sferd.pipeline.run", "--params", "params.json", "digits-teacher"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch.torchrun_args(8, 2, "params.json", "digits-teacher")


def test_torchrun_args_are_what_torchrun_parses():
    """torchrun itself reads them back as meant (its parser, no processes)."""
    from torch.distributed.run import parse_args

    a = parse_args(launch.torchrun_args(3, 2, "p.json", "s", rdzv_endpoint="h:29400", rdzv_id="r"))
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id, a.standalone) == (
        "2", "3", "c10d", "h:29400", "r-s", False)
    assert a.module and a.training_script == "sferd.pipeline.run" and a.training_script_args == ["--params", "p.json", "s"]
    a = parse_args(launch.torchrun_args(2, 1, "p.json", "s"))
    assert a.standalone and a.nproc_per_node == "2" and a.training_script_args == ["--params", "p.json", "s"]


def test_child_is_this_interpreter():
    cmd = launch.torchrun_command(["--standalone", "x"])
    assert cmd == [sys.executable, "-m", "sferd.pipeline.launch", "--torchrun", "--standalone", "x"]


def test_every_stage_kind_is_classified():
    """A new stage kind must be a decision: data-parallel (torchrun) or one process."""
    kinds = {p.stem for p in (ROOT / "sferd/pipeline/stages").glob("*.py")} - {"__init__", "common"}
    assert kinds == set(launch.SHARDABLE) | ONE_PROCESS_KINDS
    assert not launch.SHARDABLE & ONE_PROCESS_KINDS


# ------------------------------------------------------------------------------------------------ decision


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A params.json with one stage per kind; run.main and the torchrun child recorded instead of run."""
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.startswith("SFERD_"):
            monkeypatch.delenv(k)
    kinds = sorted(launch.SHARDABLE | ONE_PROCESS_KINDS)
    (tmp_path / "params.json").write_text(json.dumps({f"s-{k}": {"kind": k} for k in kinds}))
    calls: list = []
    from sferd.pipeline import run

    monkeypatch.setattr(run, "main", lambda argv: calls.append(("run", argv)) or 0)
    monkeypatch.setattr(launch, "_run_child", lambda cmd, env, stage: calls.append(("torchrun", cmd, env)) or 0)
    return tmp_path, calls


@pytest.mark.parametrize("kind", sorted(launch.SHARDABLE | ONE_PROCESS_KINDS))
def test_one_process_runs_in_process(workdir, kind):
    _, calls = workdir
    assert launch.main([f"s-{kind}"]) == 0
    assert calls == [("run", ["--params", "params.json", f"s-{kind}"])]


@pytest.mark.parametrize("kind", sorted(launch.SHARDABLE | ONE_PROCESS_KINDS))
def test_several_processes_start_torchrun_for_shardable_kinds_only(workdir, monkeypatch, kind):
    _, calls = workdir
    monkeypatch.setenv("SFERD_NPROC_PER_NODE", "2")
    monkeypatch.setenv("SFERD_MICRO_BATCH", "4")
    assert launch.main(["--params", "params.json", f"s-{kind}"]) == 0
    if kind in ONE_PROCESS_KINDS:
        assert calls == [("run", ["--params", "params.json", f"s-{kind}"])]
        return
    [(what, cmd, env)] = calls
    assert what == "torchrun" and cmd == launch.torchrun_command(launch.torchrun_args(2, 1, "params.json", f"s-{kind}"))
    # every rank sees the same resolved settings, and the rest of the environment
    assert env["SFERD_NPROC_PER_NODE"] == "2" and env["SFERD_MICRO_BATCH"] == "4" and env["SFERD_TF32"] == "0"
    assert env["PATH"] == os.environ["PATH"]


def test_several_nodes_from_the_local_file(workdir):
    d, calls = workdir
    (d / "sferd.local.toml").write_text('nnodes = 2\nrdzv_endpoint = "node0:29400"\n')
    assert launch.main(["s-teacher"]) == 0  # one process per node, two nodes: still torchrun
    assert calls[0][1] == [sys.executable, "-m", "sferd.pipeline.launch", "--torchrun", "--nnodes", "2",
                           "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29400",
                           "--rdzv_id", "sferd-s-teacher", "-m", "sferd.pipeline.run", "--params", "params.json",
                           "s-teacher"]
    calls.clear()
    assert launch.main(["s-render"]) == 0  # one-process kinds run on each node by themselves
    assert calls == [("run", ["--params", "params.json", "s-render"])]


@pytest.mark.parametrize("argv", [["no-such-stage"], ["--params", "missing.json", "s-fid"]])
def test_unreadable_stage_goes_to_the_runner_which_reports_it(workdir, monkeypatch, argv):
    _, calls = workdir
    monkeypatch.setenv("SFERD_NPROC_PER_NODE", "2")
    assert launch.main(argv) == 0 and calls == [("run", ["--params", argv[-2] if len(argv) > 1 else "params.json",
                                                         argv[-1]])]


def test_bad_settings_fail_the_stage_in_one_line(workdir, capsys):
    d, calls = workdir
    (d / "sferd.local.toml").write_text("nproc_per_node = 0\n")
    assert launch.main(["s-render"]) == 1 and calls == []
    err = capsys.readouterr().err
    assert err == "s-render: error: sferd.local.toml:1: nproc_per_node = 0 is not allowed; expected an integer >= 1, " \
                  'or "gpu" (one process per CUDA device, 1 without CUDA)\n'


# ------------------------------------------------------------------------------------------------ no torch


DECIDE_ONLY = """
import sys
from sferd.pipeline import run
run.main = lambda argv: print("in-process", "torch" in sys.modules) or 0
from sferd.pipeline import launch
sys.exit(launch.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stage,nproc", [("s-render", "8"), ("s-render", "gpu"), ("s-data", "1"), ("s-fid", "1")])
def test_the_launcher_does_not_import_torch_when_it_runs_the_stage_in_process(tmp_path, stage, nproc):
    """Checked in a fresh interpreter at the moment the launcher hands over to the stage runner."""
    (tmp_path / "params.json").write_text(json.dumps({"s-render": {"kind": "render"}, "s-data": {"kind": "data"},
                                                      "s-fid": {"kind": "fid"}}))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "SFERD_NPROC_PER_NODE": nproc}
    r = subprocess.run([sys.executable, "-c", DECIDE_ONLY, stage], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "in-process False\n", r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ real torchrun


def _fid_workspace(d: Path) -> None:
    """test_shard's two FID stages (reference statistics run) plus one whose checkpoint is missing and one long."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_shard

    cwd = os.getcwd()
    os.chdir(d)
    try:
        test_shard._two_fid_stages(d)
    finally:
        os.chdir(cwd)
    stages = json.loads((d / "params.json").read_text())
    bad = json.loads(json.dumps(stages["two"]))
    bad["source"]["checkpoint"] = "results/nope/model.pt"
    long = json.loads(json.dumps(stages["two"]))
    long["num_samples"] = 10**6
    for name, p in (("bad", bad), ("long", long)):
        p["outputs"] = {"dir": f"results/{name}", "metrics": f"results/metrics/{name}.json"}
        stages[name] = p
    (d / "params.json").write_text(json.dumps(stages))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFERD_")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.usefixtures("single_thread")
def test_failing_ranks_end_as_one_line_and_exit_code_1(tmp_path):
    """Every rank fails with a stage error: their lines, torchrun's summary as one line, no traceback."""
    _fid_workspace(tmp_path)
    r = subprocess.run([sys.executable, "-m", "sferd.pipeline.launch", "bad"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=_env(SFERD_NPROC_PER_NODE="2"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    assert "bad: error: checkpoint results/nope/model.pt is missing" in r.stderr
    assert r.stderr.rstrip().endswith("the stage did not complete"), r.stderr
    assert "bad: error: rank " in r.stderr and not (tmp_path / "results/bad/samples.npz").exists()


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.usefixtures("single_thread")
def test_signals_reach_the_ranks_and_nothing_is_left_running(tmp_path, sig, code):
    _fid_workspace(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "sferd.pipeline.launch", "long"], cwd=tmp_path, text=True,
                         env=_env(SFERD_NPROC_PER_NODE="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_descendants(p.pid)) < 3 and time.monotonic() < deadline:  # torchrun + 2 ranks
            time.sleep(0.2)
        tree = _descendants(p.pid)
        assert len(tree) >= 3, tree
        time.sleep(2)  # the ranks are past their imports and sampling
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert f"long: interrupted ({sig.name})" in err and "Traceback" not in err, err
    time.sleep(0.5)
    alive = [pid for pid in tree if Path(f"/proc/{pid}").exists() and "zombie" not in
             Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == [], alive
    assert not (tmp_path / "results/long/samples.npz").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_two_nodes_on_one_machine_equal_one_process(tmp_path):
    """Two launchers with `nnodes = 2` meet at a c10d rendezvous on localhost (each a "node" of 1 process, in
    one shared folder): the samples equal the 1-process run's, byte for byte."""
    import socket

    from sferd.pipeline.run import main

    _fid_workspace(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["one"]) == 0
    finally:
        os.chdir(cwd)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(SFERD_NNODES="2", SFERD_NPROC_PER_NODE="1", SFERD_RDZV_ENDPOINT=f"127.0.0.1:{port}")
    nodes = [subprocess.Popen([sys.executable, "-m", "sferd.pipeline.launch", "two"], cwd=tmp_path, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n=====\n".join(err for _, err in outs)
    assert "[rank 0 of 2]" in "".join(err for _, err in outs)
    assert (tmp_path / "results/one/samples.npz").read_bytes() == (tmp_path / "results/two/samples.npz").read_bytes()


def test_a_bundle_shards_only_when_every_part_does(tmp_path):
    """stage_granularity `row`: a bundle is started as its parts' kind; one unshardable part keeps it in one process."""
    params = tmp_path / "params.json"
    part = lambda name, kind: {"name": name, "params": {"kind": kind}}  # noqa: E731
    params.write_text(json.dumps({
        "chain": {"kind": "bundle", "parts": [part("a", "distill"), part("b", "distill")]},
        "mixed": {"kind": "bundle", "parts": [part("a", "fid"), part("b", "render")]},
        "broken": {"kind": "bundle", "parts": "x"},
    }))
    assert launch.stage_kind(str(params), "chain") in launch.SHARDABLE
    assert launch.stage_kind(str(params), "mixed") == "render"
    assert launch.stage_kind(str(params), "broken") is None
