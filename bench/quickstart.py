"""Time the quickstart pipeline from scratch and compare it with its budget.

Usage (from the repository root, with the project venv active; `scripts/quickstart` sets it up):
    python bench/quickstart.py            # fresh copy of the tracked tree in a temp dir, full `dvc repro`
    python bench/quickstart.py --keep     # keep the temp dir for inspection

Prints the machine (torch, CPU model, threads), the wall time of every stage (and of each part of a bundle;
the first part's time includes the imports the bundle's process pays once), the total, and the ratio to the reference budget of the design
(600 s for the whole quickstart on 2 cores, DESIGN.md) and to the 360 s target of the PD-only pipeline.
It also times the no-op `dvc repro` that follows (reference: 3 s).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 600.0
PD_TARGET_S = 360.0
NOOP_REFERENCE_S = 3.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    work = Path(tempfile.mkdtemp(prefix="sferd-bench-"))
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            if f.startswith("results/"):
                continue  # measure from scratch
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, work / f)
        (work / "dvc.lock").unlink(missing_ok=True)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=work, check=True, env=env)
        machine = subprocess.run(
            [sys.executable, "-c", "from sferd.util.machine import describe, machine_record; "
             "print(describe(machine_record(world_size=1, precision='fp32')))"],
            cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
        t0 = time.monotonic()
        marks: list[tuple[str, float]] = []
        parts: list[tuple[str, str, float]] = []  # (bundle, part, start): stage_granularity `row`
        proc = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.match(r"Running stage '([^']+)'", line)
            if m:
                marks.append((m[1], time.monotonic()))
            m = re.match(r"([a-z0-9-]+): running ([a-z0-9-]+)$", line.strip())  # sferd/pipeline/run.py, bundles
            if m:
                parts.append((m[1], m[2], time.monotonic()))
        if proc.wait() != 0:
            print("dvc repro failed", file=sys.stderr)
            return 1
        total = time.monotonic() - t0
        ends = [t for _, t in marks[1:]] + [t0 + total]
        print(f"machine: {machine}")
        print(f"{'stage':34s} {'seconds':>8s}")
        for (name, start), end in zip(marks, ends):
            print(f"{name:34s} {end - start:8.1f}")
            mine = [(part, t) for b, part, t in parts if b == name]
            # a part's time runs to the next part's start (the last one's includes the bundle's exit); the first
            # part's also holds the imports (torch, torch._dynamo) that a bundle pays once
            if mine:
                print(f"  {'(DVC and launcher)':32s} {mine[0][1] - start:8.1f}")
            for (part, t), nxt in zip(mine, [t for _, t in mine[1:]] + [end]):
                print(f"  {part:32s} {nxt - t:8.1f}")
        print(f"{'total':34s} {total:8.1f}")
        print(f"ratio to the quickstart budget ({BUDGET_S:.0f} s): {total / BUDGET_S:.2f}")
        print(f"ratio to the PD-only target ({PD_TARGET_S:.0f} s): {total / PD_TARGET_S:.2f}")
        t1 = time.monotonic()
        subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True, capture_output=True)
        noop = time.monotonic() - t1
        print(f"no-op repro: {noop:.2f} s (ratio to {NOOP_REFERENCE_S:.0f} s reference: {noop / NOOP_REFERENCE_S:.2f})")
    finally:
        if args.keep:
            print(f"workspace kept at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
