"""Where the time of a no-op `dvc repro` goes (issue 11: "a no-op `dvc repro` in ≤ 3 s").

Usage (from the repository root, with the project venv active):
    python bench/noop_repro.py            # 5 runs of each measurement, medians
    python bench/noop_repro.py --tiny     # 1 run of each (what the test runs)

Measured side by side in one run, on the working tree as it is:

- DVC's start-up: `dvc --version`, the floor of any DVC command;
- the no-op itself: `dvc repro --dry --allow-missing`, which does everything a plain `dvc repro` does before it would
  run a stage (builds the index of every pipeline in the repository, then checks the root pipeline's stages) and
  never runs a command, so the bench is safe on a workspace that is not up to date (it then says so). On an
  up-to-date workspace `--allow-missing` changes nothing (no output is missing); on a fresh clone, whose outputs are
  in no cache, it keeps DVC from stopping at the first missing one, so the figure is still a full pass;
- how long DVC takes to load each pipeline (`dvc.yaml` + `dvc.lock`, one `Index.from_file` each, in process) with
  its stage and entry counts: the part of the no-op that grows with every pipeline committed, whatever the target.

It prints the machine first and ratios against the 3 s reference of the issue and against DVC's start-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NOOP_REFERENCE_S = 3.0
ROOT = Path(__file__).resolve().parents[1]


def _wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.monotonic() - t0, r.stdout + r.stderr, r.returncode


def _pipelines() -> list[str]:
    # the compiled pipelines this repository commits: the root one and one per spec under stages/ (DESIGN.md)
    return ["dvc.yaml"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").glob("*/dvc.yaml"))


def _load_times(runs: int) -> list[tuple[str, int, int, bool, float]]:
    """(pipeline, stages, entries, has lock, median seconds to load it) through DVC's own loader."""
    from dvc.repo import Repo
    from dvc.repo.index import Index

    repo = Repo(str(ROOT))
    rows = []
    for path in _pipelines():
        times, index = [], None
        for _ in range(runs):
            t0 = time.perf_counter()
            index = Index.from_file(repo, str(ROOT / path))
            stages = list(index.stages)  # stages load lazily: force them, as `repro` does
            times.append(time.perf_counter() - t0)
        entries = sum(len(st.deps) + len(st.outs) for st in stages)
        lock = (ROOT / path).with_suffix(".lock").exists()
        rows.append((path, len(stages), entries, lock, statistics.median(times)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one run of each measurement (for the test)")
    args = ap.parse_args()
    runs = 1 if args.tiny else 5
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    sys.path.insert(0, str(ROOT))
    from sferd.util.machine import describe, machine_record

    print(f"machine: {describe(machine_record(world_size=1, precision='fp32'))}")
    if args.tiny:
        print("TINY configuration: 1 run of each measurement (figures are not medians)")

    startup = statistics.median(_wall(["dvc", "--version"], env)[0] for _ in range(runs))
    noops, up_to_date = [], True
    for _ in range(runs):
        dt, out, rc = _wall(["dvc", "repro", "--dry", "--allow-missing"], env)
        if rc != 0:
            # no figure rather than a wrong one
            first = next((ln for ln in out.splitlines() if "ERROR" in ln), out.strip()[-300:])
            print(f"the no-op could not be measured here (`dvc repro --dry` exit {rc}): {first}")
            return 1
        noops.append(dt)
        up_to_date = up_to_date and "Data and pipelines are up to date." in out
    noop = statistics.median(noops)
    rows = _load_times(runs)

    print(f"DVC start-up (`dvc --version`): {startup:.2f} s")
    print(f"no-op `dvc repro` (`--dry --allow-missing`), runs: {', '.join(f'{t:.2f}' for t in noops)} s; "
          f"median {noop:.2f} s")
    if not up_to_date:
        print("note: the root pipeline is not up to date here, so DVC also reported stages it would run")
    print(f"ratio to the {NOOP_REFERENCE_S:.0f} s reference: {noop / NOOP_REFERENCE_S:.2f}; "
          f"to DVC's start-up: {noop / startup:.1f}")
    print(f"{'pipeline':42s} {'stages':>6s} {'entries':>7s} {'lock':>4s} {'load s':>7s}")
    for path, n, entries, lock, t in rows:
        print(f"{path:42s} {n:6d} {entries:7d} {'yes' if lock else 'no':>4s} {t:7.2f}")
    total = sum(r[4] for r in rows)
    others = sum(r[4] for r in rows if r[0] != "dvc.yaml")
    print(f"loading every pipeline: {total:.2f} s ({total / noop:.0%} of the no-op); "
          f"the {len(rows) - 1} pipelines other than the root: {others:.2f} s")
    print(f"the no-op without them (estimate: no-op minus their load): {noop - others:.2f} s, "
          f"ratio to the reference {(noop - others) / NOOP_REFERENCE_S:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
