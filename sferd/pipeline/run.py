"""The stage runner: `python -m sferd.pipeline.run [--params FILE] STAGE` (DESIGN.md step 4).

Reads `params.json[STAGE]` (the fully resolved parameters the compiler wrote), imports the module for the
stage's `kind` and runs it. Kept tiny and stable on purpose: every stage depends on this file.
User-facing failures (missing data, a checkpoint from another config, …) raise `StageError` and end as one
line on stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from sferd.util.errors import StageError


def load_params(params_file: str, stage: str) -> dict:
    path = Path(params_file)
    if not path.is_file():
        raise StageError(f"{params_file} not found: run `sferd-spec compile` first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"{params_file} is not valid JSON ({e}); regenerate it with `sferd-spec compile`") from None
    if stage not in doc:
        raise StageError(f"stage {stage!r} has no section in {params_file}; recompile with `sferd-spec compile`")
    _check_digest(path, stage, doc[stage])
    return doc[stage]


DIGEST_FILE = "params.sha256.json"  # sferd.pipeline.dvcfile.DIGEST_FILE: the file DVC tracks


def _check_digest(params_path: Path, stage: str, params: dict) -> None:
    """DVC decides whether a stage is up to date by the digest file beside params.json, not by params.json itself
    (sferd/pipeline/dvcfile.py): a stage must not run params that digest does not describe, or DVC would record
    results of one config under the digest of another. A params file without a digest file beside it (a stage run
    by hand or by a test, outside any compiled pipeline) has nothing to disagree with."""
    from sferd.util.params_digest import params_digest

    digest_path = params_path.with_name(DIGEST_FILE)
    if not digest_path.is_file():
        return
    try:
        digests = json.loads(digest_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"{digest_path} is not valid JSON ({e}); regenerate it with `sferd-spec compile`") from None
    if not isinstance(digests, dict) or digests.get(stage) != params_digest(params):
        raise StageError(f"{params_path} and {digest_path} disagree about stage {stage!r} (edited by hand?); "
                         "regenerate both with `sferd-spec compile`")


# Stage kinds that run data-parallel under torchrun (the training engine, sharded FID sampling). The others are
# short single-process jobs; under torchrun every rank would run them whole and race on their outputs.
SHARDABLE = frozenset({"teacher", "distill", "distill_cfd", "predictor", "prior", "features", "fid", "fid_sferd",
                       "fid_solver", "dode_calibration", "cld_teacher", "fid_cld", "classifier"})


def refuse_unshardable(kind: str | None) -> None:
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    if kind not in SHARDABLE and world.strip() not in ("", "1"):
        raise StageError(f"a {kind!r} stage runs in one process, but WORLD_SIZE={world}: run it without torchrun "
                         "(`python -m sferd.pipeline.launch` starts torchrun only for stages that shard)")


BUNDLE = "bundle"  # graph.BUNDLE_KIND: several stages (stage_granularity `row`) run here one after the other


def _run_stage(name: str, params: dict) -> None:
    refuse_unshardable(params.get("kind"))
    from sferd.pipeline.codedeps import code_fingerprint

    # part of the config every checkpoint and resumable state records (see code_fingerprint)
    params["code_sha256"] = code_fingerprint(str(Path(__file__).resolve().parents[2]), params["kind"])
    module = importlib.import_module(f"sferd.pipeline.stages.{params['kind']}")
    module.run(name, params)


def _run_bundle(name: str, params: dict) -> None:
    """Each part exactly as its own stage would run it (its name, params, scratch folder and outputs), in graph
    order, in this one process. Under torchrun the process group is opened once here and held across the parts
    (each part's own `process_group` then leaves it alone): every rank runs every part, and a rank that finishes a
    part early (an FID stage's non-writing ranks) simply waits in the next part's first collective."""
    parts = params.get("parts")
    if not isinstance(parts, list) or not parts:
        raise StageError(f"stage {name!r} is a bundle without parts; recompile with `sferd-spec compile`")
    kinds = [p["params"].get("kind") for p in parts]
    for kind in kinds:  # before any work: a bundle that cannot run whole must not run half
        refuse_unshardable(kind)
    from sferd.util.distributed import launch, process_group

    proc = launch()
    with process_group(proc):
        for part in parts:
            print(f"{name}: running {part['name']}", file=sys.stderr, flush=True)
            _run_stage(part["name"], part["params"])
        if proc.sharded:  # nobody leaves (and closes the group) while another rank still works on the last part
            import torch.distributed as dist

            dist.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sferd.pipeline.run", description=__doc__.splitlines()[0])
    ap.add_argument("stage", help="stage name, e.g. digits-pd-s0004")
    ap.add_argument("--params", default="params.json", help="resolved params file (default: params.json)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.stage)
        if params.get("kind") == BUNDLE:
            _run_bundle(args.stage, params)
        else:
            _run_stage(args.stage, params)
    except StageError as e:
        print(f"{args.stage}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.stage}: interrupted; persisted checkpoints let the next run resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
