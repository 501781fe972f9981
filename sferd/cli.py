"""`sferd-spec`: validate, compile, plan and render experiment specs (DESIGN.md "What a user types").

Exit codes: 0 ok; 1 the tool ran and found problems (invalid spec, stale generated files); 2 usage errors
(Click); 3 an internal error (a bug: one line asking for a report; `--debug` shows the traceback). User errors print
`file:line:col: error: loc: message` lines, never a traceback. This module and
everything it imports at top level stay free of torch/torch-fidelity/dvc: `validate` must answer in well
under half a second.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

import sferd

EXIT_INTERNAL = 3


class _Commands(TyperGroup):
    """The command group; an exception no command handles is a bug, reported in one line with exit code 3.

    Typer already turns usage errors (its Click exceptions, all TyperExceptions) into exit 2 and typer.Exit into its
    code; everything else that escapes a command would otherwise print a traceback, which no input may cause
    (specs are data from other people).
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns a bug into exit code 3
            if ctx.params.get("debug"):
                raise
            _err(f"sferd-spec: internal error ({type(e).__name__}): this is a bug; please report it with the command "
                 "and the spec file (run again with --debug for the traceback)")
            ctx.exit(EXIT_INTERNAL)


app = typer.Typer(
    name="sferd-spec",
    help="Validate, compile, plan and render sferd experiment specs.",
    cls=_Commands,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,
)

SPECS_DIR = Path("specs")
SCHEMA_PATH = SPECS_DIR / "spec.schema.json"


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        print(f"sferd-spec {sferd.__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, show the Python traceback."),
) -> None:
    """Specs in specs/*.yaml are the experiments; dvc.yaml/params.json are compiled from them."""


SCALE_HELP = "Load the spec at this scale profile (its `scales:` block), e.g. smoke: own pipeline, table and stage names."


def _load_checked(p: Path, scale: str | None):
    """Load a spec at `scale`; loaded at its own scale, every profile it defines must load too (a broken `smoke`
    profile is an error now, not when someone first asks for it)."""
    from sferd.spec import SpecError, load_spec

    spec = load_spec(p, display_path=p.as_posix(), scale=scale)
    if scale is None:
        issues = []
        for name in spec.scales:
            try:
                load_spec(p, display_path=p.as_posix(), scale=name)
            except SpecError as e:
                issues.extend(e.issues)
        if issues:
            raise SpecError(issues)
    return spec


def _fail(issues) -> None:
    """Print located issues, sorted and each once (a base spec's error, reached through each spec extending it),
    with a count, and exit 1."""
    issues = sorted(set(issues))
    for i in issues:
        _err(i.format())
    _err(f"{len(issues)} error{'s' if len(issues) != 1 else ''}")
    raise typer.Exit(1)


def _load_all(paths: list[Path], scale: str | None = None):
    """Load every spec (at scale profile `scale`); print all problems and exit 1 if any is invalid."""
    from sferd.spec import SpecError

    specs, issues = [], []
    for p in paths:
        try:
            specs.append((p, _load_checked(p, scale)))
        except SpecError as e:
            issues.extend(e.issues)
    if issues:
        _fail(issues)
    return specs


def _graph(spec, path: Path):
    from sferd.pipeline.graph import build_graph

    return build_graph(spec, spec_path=path.as_posix())


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000.0
    return f"{n:.3g}E"


@app.command()
def validate(
    specs: List[Path] = typer.Argument(..., help="Spec files to check.", exists=False),
    format: str = typer.Option("text", "--format", help="Output format: text or json."),
    scale: Optional[str] = typer.Option(None, "--scale", help=SCALE_HELP),
) -> None:
    """Check specs before any compute; print a short summary or located errors.

    Examples:
      sferd-spec validate specs/quickstart.yaml
      sferd-spec validate specs/*.yaml --format json
      sferd-spec validate specs/table1.yaml --scale smoke
    """
    if format not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--format")
    from sferd.spec import SpecError

    results, issues = [], []
    for p in specs:
        try:
            spec = _load_checked(p, scale)
        except SpecError as e:
            issues.extend(e.issues)
            results.append({"spec": p.as_posix(), "valid": False, "errors": [i.format() for i in e.issues]})
            continue
        stages = _graph(spec, p)
        cost = sum(s.cost.get("forward_passes", 0.0) for s in stages)
        results.append(
            {"spec": p.as_posix(), "valid": True, "name": spec.name, "scale": scale, "dataset": spec.dataset.id,
             "stages": len(stages), "methods": [m.name for m in spec.methods],
             "student_steps": spec.evaluation.student_steps, "forward_passes": cost}
        )
    issues = sorted(set(issues))
    if format == "json":
        print(json.dumps(results, indent=2))
    else:
        for i in issues:
            _err(i.format())
        if issues:
            _err(f"{len(issues)} error{'s' if len(issues) != 1 else ''}")
        for r in results:
            if r["valid"]:
                print(
                    f"{r['spec']}: ok — {r['name']}{' at scale ' + r['scale'] if r['scale'] else ''} on "
                    f"{r['dataset']}: {r['stages']} stages, methods "
                    f"{', '.join(r['methods'])}, students at {', '.join(map(str, r['student_steps']))} steps "
                    f"(NFE = steps), ~{_human(r['forward_passes'])} image forward passes"
                )
    if issues:
        raise typer.Exit(1)


def _default_specs() -> list[Path]:
    return sorted(p for p in SPECS_DIR.glob("*.yaml"))


def _homes(specs, *, strict: bool = True) -> list[tuple[str, object]]:
    """(home pipeline, stage) for every distinct stage of `specs`, in graph order per pipeline; exit 1 when two
    specs define one stage name differently (not strict: the first definition wins, for information only)."""
    seen_paths: set[str] = set()
    everything = []
    for path, spec in specs:
        if path.as_posix() not in seen_paths:
            seen_paths.add(path.as_posix())
            everything.append((path, spec))
    # homes: the root pipeline first, then specs that extend no other (the table an ablation extends owns the
    # teacher and chain they share), then by pipeline name
    everything.sort(key=lambda ps: (ps[1].pipeline not in ("", "."), ps[1].extends is not None, ps[1].pipeline,
                                    ps[0].as_posix()))
    home: dict[str, tuple[str, object, Path, object]] = {}  # stage name → (pipeline, stage, defining spec file, spec)
    out: list[tuple[str, object]] = []
    for path, spec in everything:
        for st in _graph(spec, path):
            if st.name in home:
                if strict and home[st.name][1] != st:
                    _fail([_clash_issue(st, path, spec, *home[st.name][1:])])
                continue
            home[st.name] = (spec.pipeline, st, path, spec)
            out.append((spec.pipeline, st))
    return out


def _clash_issue(stage, path: Path, spec, first, first_path: Path, first_spec):
    """Two specs define stage `stage.name` differently: one issue at the later definition that also gives the first's
    file:line:col (the fix may belong in either file) and the first parameter in which they differ. The hint does not
    say "rename": a teacher's, data or feature stage's name comes from the dataset, so two specs on one dataset share
    it by design and must agree on its settings."""
    from sferd.spec import spec_issue

    there_field = _stage_field(first_spec, first)
    there = spec_issue(first_path, there_field, "", display_path=first_path.as_posix())
    differs = _first_difference(first.params, stage.params)
    what = (f"{differs[0]} is {differs[1]} there, {differs[2]} here" if differs
            else "its inputs or outputs differ")
    return spec_issue(path, _stage_field(spec, stage),
                      f"stage {stage.name} is also defined by {there.path}:{there.line}:{there.col} "
                      f"({'.'.join(map(str, there_field))}) with different parameters: {what} (specs that define "
                      "the same stage must give it the same settings)",
                      display_path=path.as_posix())


def _first_difference(a, b, where: str = "params") -> tuple[str, str, str] | None:
    """(dotted key, value in `a`, value in `b`) of the first place two stage-params trees differ, values shortened;
    None when they are equal."""
    from sferd.spec.limits import echo

    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            if k not in a or k not in b:
                return f"{where}.{k}", echo(a[k]) if k in a else "not set", echo(b[k]) if k in b else "not set"
            found = _first_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}.{i}")
            if found:
                return found
        return None
    return None if a == b else (where, echo(a), echo(b))


# stage kinds whose names start with a method's name (a clash is located at that method)
METHOD_STAGE_KINDS = ("distill", "distill_cfd", "predictor", "prior", "fid", "fid_sferd", "fid_solver", "dode_calibration",
                      "fid_cld", "classifier")


def _stage_field(spec, stage) -> tuple:
    """The spec field a stage's name comes from, to locate a clash: its method, else its block."""
    for m, method in enumerate(spec.methods):
        if f"-{method.name}-" in f"{stage.name}-" and stage.kind in METHOD_STAGE_KINDS:
            return ("methods", m, "name")
    if stage.kind == "cld_teacher":  # named after the teacher block of the first CLD row that uses it
        for m, method in enumerate(spec.methods):
            if getattr(method, "kind", None) == "cld" and stage.name.endswith(f"-{method.teacher.name}-teacher"):
                return ("methods", m, "teacher", "name")
    return {"data": ("dataset",), "features": ("features",), "teacher": ("teacher",), "teacher_import": ("teacher",),
            "render": ("table", "id")}.get(stage.kind, ("name",))


def _editor_schema(model) -> dict:
    """The JSON Schema editors use: what a spec *file* may hold. `scale` is set by --scale, never written; with
    `extends`, the set-up fields may come from the base, so they are required only without it."""
    from sferd.spec.extends import INHERITED

    schema = model.model_json_schema()
    schema["properties"].pop("scale", None)
    inherited = [k for k in schema.get("required", []) if k in INHERITED]
    schema["required"] = [k for k in schema.get("required", []) if k not in INHERITED]
    schema["anyOf"] = [{"required": ["extends"]}, {"required": inherited}]
    return schema


def _compiled_files(specs, context=()) -> dict[str, str]:
    """Every generated file (path → text) for the pipelines of `specs`.

    A stage that several specs define identically (the shared data, feature network and teacher of an ablation
    and the quickstart) is written once, in its home pipeline: the root pipeline if a root spec has it, else a
    spec that extends none, else the first pipeline by name. Other pipelines depend on its outputs, and DVC links
    the files into one graph.
    `context` are further specs (all of specs/) consulted only to find those homes.
    """
    from sferd.pipeline.dvcfile import CompileError, pipeline_files
    from sferd.spec.models import Spec

    wanted = {spec.pipeline for _, spec in specs}
    by_pipeline: dict[str, list[object]] = {}
    from sferd.pipeline.graph import bundle

    from sferd.pipeline.dvcfile import stage_kinds

    for pipeline, stage in bundle(_homes([*specs, *context])):  # stage_granularity: row → one DVC stage per group
        by_pipeline.setdefault(pipeline, []).append(stage)
    # The code fingerprint stage is shared like the teacher: one stage, in the first pipeline (_homes sorts the root
    # pipeline first), covering the kinds of every pipeline, the context's too, so that compiling one spec alone
    # writes the same stage as compiling them all.
    # A scaled pipeline (--scale) is compiled alone, on demand, often where the home pipeline was never compiled:
    # it holds a fingerprint stage of its own (dvcfile.dvc_documents).
    scaled = {spec.pipeline for _, spec in specs if spec.scale is not None}
    code_home = next((p for p in by_pipeline if p not in scaled), None)
    all_kinds = stage_kinds([st for stages in by_pipeline.values() for st in stages])
    files: dict[str, str] = {}
    for pipeline, stages in by_pipeline.items():
        if pipeline not in wanted:
            continue
        try:
            files.update(pipeline_files(stages, pipeline=pipeline, root=".",
                                        code_kinds=all_kinds if pipeline == code_home else None,
                                        own_code=pipeline in scaled))
        except CompileError as e:
            from sferd.spec import spec_issue

            path = next(p for p, spec in specs if spec.pipeline == pipeline)
            _fail([spec_issue(path, ("pipeline",), f"pipeline {pipeline}: {e}", display_path=path.as_posix())])
    files[SCHEMA_PATH.as_posix()] = json.dumps(_editor_schema(Spec), indent=2, sort_keys=True) + "\n"
    return files


@app.command("compile")
def compile_(
    specs: Optional[List[Path]] = typer.Argument(None, help="Specs to compile (default: specs/*.yaml)."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 with a diff if files are stale."),
    scale: Optional[str] = typer.Option(None, "--scale", help=SCALE_HELP + " Needs explicit SPECs."),
) -> None:
    """Write the DVC pipeline(s), resolved params and the spec JSON Schema.

    Examples:
      sferd-spec compile                       # every spec in specs/
      sferd-spec compile specs/quickstart.yaml
      sferd-spec compile --check               # CI: are committed files up to date?
      sferd-spec compile specs/table1.yaml --scale smoke   # -> stages/table1-smoke/
    """
    if not Path("sferd").is_dir():
        _err("error: run sferd-spec compile from the repository root (the folder holding sferd/ and specs/)")
        raise typer.Exit(1)
    if scale is not None and not specs:
        raise typer.BadParameter("name the spec(s) to compile at this scale", param_hint="--scale")
    paths = list(specs) if specs else _default_specs()
    chosen = _load_all(paths, scale)
    others = [p for p in _default_specs() if p.resolve() not in {q.resolve() for q in paths}]
    context = _load_all(others) if specs else []
    _check_owners(chosen, context)
    files = _compiled_files(chosen, context)
    _check_targets(files, chosen)  # everything is checked before the first file is written
    stale = []
    for rel, text in sorted(files.items()):
        p = Path(rel)
        old = p.read_text(encoding="utf-8") if p.is_file() else ""
        if old == text:
            continue
        stale.append(rel)
        if check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), f"a/{rel}", f"b/{rel}"))
        else:
            from sferd.util.artifacts import atomic_write_text

            try:
                atomic_write_text(p, text)
            except OSError as e:
                _fail([_issue_for_file(rel, chosen, f"cannot write {rel}: {e.strerror or e}")])
            print(f"wrote {rel}")
    if check:
        if stale:
            _err(f"{len(stale)} generated file(s) stale: {', '.join(stale)}; run `sferd-spec compile`")
            raise typer.Exit(1)
        print("generated files are up to date")
    elif not stale:
        print("nothing to do: generated files are up to date")


def _pipelines_of(spec) -> list[str]:
    """The pipeline folders a spec owns: its own, and (loaded at its own scale) one per scale profile."""
    from sferd.spec.scale import scaled_pipeline

    if spec.scale is not None:
        return [spec.pipeline]
    return [spec.pipeline, *(scaled_pipeline(spec.pipeline, spec.name, name) for name in spec.scales)]


def _check_owners(chosen, context) -> None:
    """Each pipeline folder belongs to one spec: compiling a spec into a folder that another spec's pipeline (or one
    of its scale profiles) owns would overwrite that pipeline."""
    from sferd.spec import spec_issue

    issues = []
    for path, spec in chosen:
        for other_path, other in [*context, *chosen]:
            if other_path.resolve() == path.resolve():
                continue
            if spec.pipeline in _pipelines_of(other):
                issues.append(spec_issue(path, ("pipeline",), f"pipeline folder {spec.pipeline} belongs to "
                                         f"{other_path.as_posix()}: give this spec its own stages/<name>",
                                         display_path=path.as_posix()))
                break
    if issues:
        _fail(issues)


def _issue_for_file(rel: str, chosen, message: str):
    """A write problem, located at the `pipeline:` of the spec whose folder holds `rel` (else at the file)."""
    from sferd.spec import spec_issue
    from sferd.spec.loader import SpecIssue

    folder = Path(rel).parent.as_posix()
    for path, spec in chosen:
        if spec.pipeline == folder:
            return spec_issue(path, ("pipeline",), message, display_path=path.as_posix())
    return SpecIssue(rel, 1, 1, "", message)


def _check_targets(files: dict[str, str], chosen) -> None:
    from sferd.pipeline.writes import write_problem

    root = Path.cwd()
    issues = [_issue_for_file(rel, chosen, reason) for rel in sorted(files)
              if (reason := write_problem(root, rel)) is not None]
    if issues:
        _fail(issues)


# Stated throughput for the GPU-hour estimate: an A100's dense bf16 peak (312 TFLOP/s) at 40 % utilisation,
# a typical figure for U-Net training. `--tflops` sets another.
DEFAULT_TFLOPS = 125.0


def _unet_gflops(model: dict) -> float:
    """FLOPs of one image through the U-Net, counted by torch on meta tensors (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sferd.nn.build import build_unet

    with torch.device("meta"):
        net = build_unet(model)
        r, c = model["resolution"], model["in_channels"]
        y = torch.zeros(1, dtype=torch.long) if model.get("num_classes") else None
        counter = FlopCounterMode(display=False)
        with counter:
            net(torch.zeros(1, c, r, r), torch.zeros(1), y)
    return counter.get_total_flops() / 1e9


def _valid_specs(besides: Path) -> list:
    """The other specs in specs/ that load (for `plan`'s shared-stage notes: an invalid one elsewhere must not stop
    planning this one)."""
    from sferd.spec import SpecError, load_spec

    out = []
    for p in _default_specs():
        if p.resolve() == besides.resolve():
            continue
        try:
            out.append((p, load_spec(p, display_path=p.as_posix())))
        except SpecError:
            continue
    return out


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Spec file."),
    tflops: float = typer.Option(DEFAULT_TFLOPS, "--tflops", min=1e-6,
                                 help="Sustained TFLOP/s per GPU for the GPU-hour estimate (default: A100 bf16 at 40 %)."),
    scale: Optional[str] = typer.Option(None, "--scale", help=SCALE_HELP),
    gpu_memory_gib: float = typer.Option(80.0, "--gpu-memory-gib", min=1e-3,
                                         help="GPU memory for the per-GPU memory / micro-batch lines (default 80)."),
) -> None:
    """Print the stage graph in order with inputs, outputs and estimated work (forward passes, GPU-hours)
    and, for U-Net training stages, per-GPU memory and the micro-batch that fits `--gpu-memory-gib`.

    Examples:
      sferd-spec plan specs/quickstart.yaml
      sferd-spec plan specs/table2.yaml --tflops 60
    """
    [(path, s)] = _load_all([spec], scale)
    from sferd.nn.memory import ASSUMPTIONS as MEMORY_ASSUMPTIONS, plan_line as plan_memory_line

    stages = _graph(s, path)
    # stages another pipeline owns (an ablation's shared teacher and chain) are run once, there
    home = {st.name: pipeline for pipeline, st in _homes([(path, s), *_valid_specs(path)], strict=False)}
    teacher = next(st for st in stages if st.kind in ("teacher", "teacher_import"))
    gflops = _unet_gflops(teacher.params["model"])
    hours_per_pass = gflops * 1e9 / (tflops * 1e12) / 3600.0
    total = shared = 0.0
    for k, st in enumerate(stages, 1):
        fp = st.cost.get("forward_passes", 0.0)
        total += fp
        cost = f"  ~{_human(fp)} image forward passes, ~{fp * hours_per_pass:.3g} GPU-h" if fp else ""
        owner = home.get(st.name, s.pipeline)
        if owner != s.pipeline:
            shared += fp
            cost += f"  (stage of {owner if owner not in ('', '.') else 'the root pipeline'})"
        print(f"{k:3d}. {st.name}  [{st.kind}]{cost}")
        mem = plan_memory_line(st.params, gpu_memory_gib)  # sferd/nn/memory.py: None for non-U-Net stages
        if mem:
            print(f"       {mem}")
        for d in st.deps:
            print(f"       in : {d}")
        for o in (*st.outs, *st.metrics, *st.uncached_outs):
            print(f"       out: {o}")
    print(f"{len(stages)} stages, ~{_human(total)} image forward passes in total "
          "(a training update counts forward + backward as 3 passes; PD adds 2 teacher passes, guidance 2 more)")
    h = total * hours_per_pass
    print(f"estimate: ~{h:,.0f} GPU-hours" if h >= 100 else f"estimate: ~{h:.3g} GPU-hours", end="")
    print(f" at {tflops:g} TFLOP/s sustained, "
          f"{gflops:.4g} GFLOP per U-Net forward pass of one image (counted by torch; every pass priced as one)")
    if shared:
        own = (total - shared) * hours_per_pass
        print(f"of which ~{shared * hours_per_pass:,.0f} GPU-hours are stages other pipelines own (run once, shared); "
              f"this pipeline's own stages: ~{own:,.0f} GPU-hours")
    print(f"mem: {MEMORY_ASSUMPTIONS}")


@app.command()
def render(
    spec: Path = typer.Argument(..., help="Spec file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    scale: Optional[str] = typer.Option(None, "--scale", help=SCALE_HELP),
) -> None:
    """Render the spec's table from whatever metrics exist; missing cells are marked.

    Examples:
      sferd-spec render specs/quickstart.yaml
      sferd-spec render specs/quickstart.yaml -o /tmp/table.md
      sferd-spec render specs/table1.yaml --scale smoke
    """
    [(path, s)] = _load_all([spec], scale)
    from sferd.report.table import render_markdown, table_context

    [st] = [st for st in _graph(s, path) if st.kind == "render"]
    p = st.params
    text = render_markdown(table_context(p["spec"], p["table"], p["rows"], p["reported"],
                                         extra_metrics=p.get("extra_metrics", ()), scale=p.get("scale")))
    if output is None:
        sys.stdout.write(text)
    else:
        from sferd.util.artifacts import atomic_write_text

        atomic_write_text(output, text)
        print(f"wrote {output}")


FEATURES_ASSETS = Path("assets/features")


def features_asset(dataset_id: str, version: str) -> Path:
    """Where `features-train` writes a version: named by the dataset id (digits-8x8 and digits-16x16 weights differ,
    though both datasets' stage names say `digits`), the network kind and the version."""
    return FEATURES_ASSETS / f"{dataset_id}-digits-cnn-{version}.pt"


def _publish(staged: Path, target: Path) -> bool:
    """Move a finished file to `target` unless something is there already; False when it is. A hard link is the
    atomic "create if absent" of POSIX; where links are not supported, a check and a rename."""
    import os

    try:
        os.link(staged, target)
    except FileExistsError:
        return False
    except OSError:
        if target.exists():
            return False
        os.replace(staged, target)
    return True


@app.command("features-train")
def features_train(
    spec: Path = typer.Argument(..., help="Spec whose `features` block (training settings) and data split to use."),
    version: str = typer.Option(..., "--version", help="New weights version: lowercase letters, digits, dots and dashes, starting with a letter or digit (e.g. v2)."),
    scale: Optional[str] = typer.Option(None, "--scale", help=SCALE_HELP),
) -> None:
    """Train the FID feature network once, as the `features` stage would, and write it as a new fixed version.

    Builds the spec's data split in a temporary folder, trains with the spec's `features` settings (the same
    engine, seed and draws as the stage), writes assets/features/<dataset-id>-digits-cnn-<version>.pt and a JSON
    sidecar beside it (settings, data, accuracy, torch and machine, sha256), and prints the `weights:` block to
    put under `features:` in the spec. An existing version is never overwritten: weights trained on another
    machine differ in the last float digits, so a version names one file forever. Run from the repository root.

    Examples:
      sferd-spec features-train specs/quickstart.yaml --version v2
    """
    from sferd.spec.models import WEIGHTS_VERSION_MAX, WEIGHTS_VERSION_RE

    if len(version) > WEIGHTS_VERSION_MAX or not WEIGHTS_VERSION_RE.fullmatch(version):
        raise typer.BadParameter(f"must match [a-z0-9][a-z0-9.-]*, at most {WEIGHTS_VERSION_MAX} characters",
                                 param_hint="--version")
    [(path, s)] = _load_all([spec], scale)
    if s.features is None:
        from sferd.spec import spec_issue

        _fail([spec_issue(path, ("evaluation", "feature_extractor"), "features-train needs a `features` block (this "
                          "spec's FID does not use the digits-cnn)", display_path=path.as_posix())])
    if not path.resolve().is_relative_to(Path.cwd().resolve()):
        _err(f"error: {path} is outside the current folder: run features-train from the repository root")
        raise typer.Exit(1)
    target = features_asset(s.dataset.id, version)
    sidecar = target.with_suffix(".json")
    for f in (target, sidecar):
        if f.exists():
            _err(f"error: {f} exists: a weights version is never overwritten; choose a new --version")
            raise typer.Exit(1)

    import copy
    import shutil
    import tempfile

    from sferd.pipeline.stages import data as data_stage, features as feat_stage
    from sferd.util.artifacts import canonical_json, sha256_file
    from sferd.util.errors import StageError

    graph = _graph(s, path)
    [data_st] = [st for st in graph if st.kind == "data"]
    [feat_st] = [st for st in graph if st.kind == "features"]
    FEATURES_ASSETS.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".features-train-", dir=FEATURES_ASSETS))  # same file system: link works
    written: list[Path] = []

    def write(trained) -> None:
        from sferd.nn.digits_cnn import save_digits_cnn

        record = feat_stage.weights_record(params)
        held, train_acc = round(trained.heldout_accuracy, 6), round(trained.train_accuracy, 6)
        # the file describes itself (the stage checks these against the spec); all plain data, weights_only-safe
        save_digits_cnn(staging / target.name, trained.net,
                        config={**trained.config, "version": version, **record, "heldout_accuracy": held})
        sha = sha256_file(staging / target.name)
        side = {"version": version, "file": target.name, "sha256": sha, "spec": path.as_posix(), "stage": feat_st.name,
                **record, "network": {k: params["network"][k] for k in ("kind", "feature_dim", "width")},
                **{k: trained.config[k] for k in ("channels", "resolution")},
                "heldout_accuracy": held, "train_accuracy": train_acc,
                "loss_mean_recent": trained.summary["loss_mean_recent"], "sferd_version": sferd.__version__,
                "torch": trained.summary["machine"]["torch"], "machine": trained.summary["machine"]}
        (staging / sidecar.name).write_text(canonical_json(side), encoding="utf-8")
        if not _publish(staging / target.name, target):
            raise StageError(f"{target} appeared while training: a weights version is never overwritten; "
                             "choose a new --version")
        written.append(target)
        if not _publish(staging / sidecar.name, sidecar):
            raise StageError(f"{sidecar} appeared while training; choose a new --version")
        written.append(sidecar)
        print(f"wrote {target} (sha256 {sha}, held-out accuracy {held:.4f}, train accuracy {train_acc:.4f})")
        print(f"wrote {sidecar}")
        print(f"put this under `features:` in {path.as_posix()} (then `sferd-spec compile`):")
        print(f"  weights:\n    version: {version}\n    path: {target.as_posix()}\n    sha256: {sha}")

    try:
        with tempfile.TemporaryDirectory(prefix="sferd-features-train-") as tmp:
            work = Path(tmp)
            # the data stage's own code on the spec's dataset: the very split the stage trains on
            data_stage.run(data_st.name, {**data_st.params, "outputs": {"dir": str(work / "data")}})
            params = copy.deepcopy(feat_st.params)
            params.pop("weights", None)  # retraining: the spec's current weights play no part
            params["inputs"] = {"train": str(work / "data/train"), "heldout": str(work / "data/heldout")}
            params["outputs"] = {"dir": str(work / "out"), "metrics": str(work / "metrics.json")}
            # the stage's name: the same per-sample draws as the stage; scratch state in the temporary folder
            feat_stage.train_network(feat_st.name, params, write, root=work)
    except StageError as e:
        for f in reversed(written):  # a version is a .pt with its sidecar, or nothing
            f.unlink(missing_ok=True)
        _err(f"sferd-spec features-train: error: {e}")
        raise typer.Exit(1)
    except BaseException:
        for f in reversed(written):
            f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


INDEX_PATH = Path("results/README.md")


def index_text(specs) -> str:
    """results/README.md: every table of every spec with its status (measured / reported / missing cells)."""
    from sferd.report.markdown import link_text, table_cell
    from sferd.report.table import table_context

    lines = [
        "# Results",
        "",
        "Generated by `sferd-spec index` from the specs in `specs/` and the metrics that exist; do not edit.",
        "A cell is one (model, steps) of a table, averaged over seeds; reported cells are paper numbers beside ours.",
        "",
        "| table | spec | pipeline | cells measured | cells missing | reported numbers | how to run |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for path, spec in specs:
        [st] = [st for st in _graph(spec, path) if st.kind == "render"]
        p = st.params
        ctx = table_context(p["spec"], p["table"], p["rows"], p["reported"],
                            extra_metrics=p.get("extra_metrics", ()))
        reported = sum(v is not None for r in p["reported"] for v in r["values"].values())
        run = "`dvc repro`" if spec.pipeline in ("", ".") else f"`dvc repro {spec.pipeline}/dvc.yaml`"
        md = Path(p["outputs"]["markdown"])
        title = p["table"]["title"]  # spec text: escaped, so a `|` or `]` in it cannot split the row or the link
        link = (table_cell(f"[{link_text(title)}](tables/{md.name})") if md.is_file()
                else f"{table_cell(title)} (not rendered yet: `sferd-spec render {path.as_posix()}` shows it)")
        lines.append(f"| {link} | `{path.as_posix()}` | `{spec.pipeline}` | {ctx['n_cells'] - ctx['n_missing']} | "
                     f"{ctx['n_missing']} | {reported} | {run} |")
    return "\n".join(lines) + "\n"


@app.command()
def index(
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if results/README.md is stale."),
) -> None:
    """Write results/README.md: every table with its status (run after `dvc repro` of any pipeline).

    Examples:
      sferd-spec index
      sferd-spec index --check
    """
    text = index_text(_load_all(_default_specs()))
    old = INDEX_PATH.read_text(encoding="utf-8") if INDEX_PATH.is_file() else ""
    if check:
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), f"a/{INDEX_PATH}", f"b/{INDEX_PATH}"))
            _err(f"{INDEX_PATH} is stale; run `sferd-spec index`")
            raise typer.Exit(1)
        print(f"{INDEX_PATH} is up to date")
        return
    from sferd.util.artifacts import atomic_write_text

    atomic_write_text(INDEX_PATH, text)
    print(f"wrote {INDEX_PATH}")


if __name__ == "__main__":  # pragma: no cover
    app()
