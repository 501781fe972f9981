"""The stage launcher: `python -m sferd.pipeline.launch [--params FILE] STAGE`, the `cmd` of every compiled stage.

`dvc repro` starts the processes itself (DESIGN.md "Scale"). The launcher reads the machine-local runtime
settings (`sferd.util.runtime`: `SFERD_*` environment variables over `sferd.local.toml`) and the stage's `kind`
from the params file, then either

- runs the stage in this process through the stage runner (`sferd.pipeline.run.main`) when one process is asked
  for or the kind runs on one process only: no second interpreter and no torch import here, because the
  quickstart runs ~50 stages and every extra interpreter start costs seconds; or
- starts torchrun (`torch.distributed.run`, same interpreter) with `--nproc_per_node N` on one node
  (`--standalone`) or several (`--nnodes M`, c10d rendezvous at `rdzv_endpoint`), each rank running the stage
  runner; SIGINT/SIGTERM are forwarded to it and its failure ends as one line and exit code 1.

Runtime settings never enter the stage's params: the same `dvc.lock` is valid for any process count. The ranks
get the resolved settings as `SFERD_*` variables, so every rank sees the same values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Kinds whose stage code is data-parallel under torchrun (training stages refuse WORLD_SIZE > 1 themselves until
# they are); every other kind (data, reference, render, teacher_import, or one this list does not know yet) runs
# in one process whatever the settings say, on every node.
SHARDABLE = frozenset({"teacher", "distill", "distill_cfd", "predictor", "prior", "features", "fid", "fid_sferd",
                       "fid_solver", "dode_calibration", "cld_teacher", "fid_cld", "classifier"})
RUNNER = "sferd.pipeline.run"
TORCHRUN_MODE = "--torchrun"  # internal: this module as torchrun with one-line failures (see `torchrun_main`)


def stage_kind(params_file: str, stage: str) -> str | None:
    """The stage's kind, or None when the params file cannot say (the stage runner then reports why). A bundle
    (several stages run in one process, stage_granularity `row`) counts as `bundle` when every part's kind
    shards (its first part's kind is then returned), else as its first unshardable part's kind: it runs in one
    process then."""
    try:
        with open(params_file, encoding="utf-8") as f:
            entry = json.load(f)[stage]
        kind = entry["kind"]
        if kind == "bundle":
            kinds = [part["params"]["kind"] for part in entry["parts"]]
            return next((k for k in kinds if k not in SHARDABLE), kinds[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kind if isinstance(kind, str) else None


def torchrun_args(nproc_per_node: int, nnodes: int, params_file: str, stage: str, *,
                  rdzv_endpoint: str | None = None, rdzv_id: str = "sferd") -> list[str]:
    """torchrun's command-line arguments for one stage.

    One node: `--standalone` (a private rendezvous on a free local port, so concurrent runs never collide).
    Several: torchrun's c10d rendezvous at `rdzv_endpoint`, hosted by the agent on that host. The run id gets the
    stage name: each stage is its own torchrun, and a node that reaches the next stage early must never join the
    previous stage's rendezvous (an elastic agent treats a late joiner as a membership change and restarts its
    workers, which would then run another stage's command).
    """
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint")
        head = ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", f"{rdzv_id}-{stage}"]
    else:
        head = ["--standalone", "--nproc_per_node", str(nproc_per_node)]
    return [*head, "-m", RUNNER, "--params", params_file, stage]


def torchrun_command(args: list[str]) -> list[str]:
    """The child process: this interpreter running `torch.distributed.run` with `args` (through `torchrun_main`)."""
    return [sys.executable, "-m", "sferd.pipeline.launch", TORCHRUN_MODE, *args]


def torchrun_main(args: list[str]) -> int:
    """`python -m torch.distributed.run ARGS`, with its failures as one line instead of torchrun's traceback.

    torchrun reports a failed rank by raising ChildFailedError out of its `main` (a traceback plus a table);
    the rank's own one-line error is already on stderr, so one summary line is all that is added here.
    """
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    stage = args[-1]
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        print(f"{stage}: error: rank {rank} {how} (its own error, if any, is above); the stage did not complete",
              file=sys.stderr)
        return 1
    except SignalException as e:  # SIGINT/SIGTERM forwarded by the launcher; torchrun has stopped the ranks
        print(f"{stage}: interrupted ({e.sigval.name}); persisted checkpoints let the next run resume",
              file=sys.stderr)
        return 128 + int(e.sigval)
    except Exception as e:  # rendezvous failures (endpoint unreachable, timeout), bad arguments, …
        print(f"{stage}: error: torchrun failed: {type(e).__name__}: {e}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


def _cuda_devices() -> int:
    """CUDA devices on this node (0 without CUDA). Imports torch: only on the path that starts torchrun anyway."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, however it dies (SIGKILL, the OOM killer, a CI
    timeout). Otherwise an orphaned torchrun would go on training beside the next `dvc repro` of the same stage
    (the stage's scratch lock then refuses the newcomer, but the orphan would still hold the machine)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1 (Linux)
    except (OSError, AttributeError):  # not Linux: nothing to set
        pass


def _run_child(cmd: list[str], env: dict[str, str], stage: str) -> int:
    """Run torchrun as a child and wait, forwarding SIGINT/SIGTERM once.

    The child gets its own process group: a Ctrl-C in the terminal then reaches it only through this forwarding,
    not twice (once from the terminal, once from here), which would cut short torchrun's own shutdown of its ranks.
    """
    import signal
    import subprocess

    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code < 0:  # the child itself was killed (SIGKILL, OOM killer): nothing printed a line yet
        print(f"{stage}: error: torchrun was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return 128 - code
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TORCHRUN_MODE]:
        return torchrun_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m sferd.pipeline.launch", description=__doc__.splitlines()[0])
    ap.add_argument("stage", help="stage name, e.g. digits-pd-s0004")
    ap.add_argument("--params", default="params.json", help="resolved params file (default: params.json)")
    args = ap.parse_args(argv)

    from sferd.util.runtime import RuntimeSettingsError, runtime_settings

    try:
        rt = runtime_settings()
        kind = stage_kind(args.params, args.stage)
        # "gpu" is resolved (torch imported) only for a kind that could use several processes on one node
        nproc = rt.procs_per_node() if kind in SHARDABLE and rt.nnodes == 1 else None
    except RuntimeSettingsError as e:
        print(f"{args.stage}: error: {e}", file=sys.stderr)
        return 1
    if kind in SHARDABLE and (rt.nnodes > 1 or nproc > 1):
        nproc = rt.procs_per_node()
        gpus = _cuda_devices()
        if gpus and nproc > gpus:  # rank LOCAL_RANK runs on cuda:LOCAL_RANK: more ranks than GPUs cannot start
            print(f"{args.stage}: error: {nproc} processes per node asked for, but this node has {gpus} CUDA "
                  f"device(s): set SFERD_NPROC_PER_NODE (or nproc_per_node in sferd.local.toml) to at most {gpus}, "
                  'or to "gpu"', file=sys.stderr)
            return 1
        cmd = torchrun_command(torchrun_args(nproc, rt.nnodes, args.params, args.stage,
                                             rdzv_endpoint=rt.rdzv_endpoint, rdzv_id=rt.rdzv_id))
        return _run_child(cmd, {**os.environ, **rt.as_env()}, args.stage)

    from sferd.pipeline import run

    return run.main(["--params", args.params, args.stage])


if __name__ == "__main__":
    sys.exit(main())
