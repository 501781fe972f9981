"""Spec → stage graph (DESIGN.md "How a spec becomes results", step 2). Pure: no I/O, no torch.

The graph is a list of `Stage`s in a valid execution order:
data → feature network → teacher → one stage per halving per method → one FID stage per
(model, steps) and per calibration row → one render stage per table.

Training stages (teacher, halvings, predictor, prior, feature network) carry the spec's `precision`: it changes
their results, so it is part of their params (and of their DVC cache key).

Every stage carries its *fully resolved* parameters (what the stage runner reads), the paths it reads and
writes (deterministic, derived from the stage name), and an estimate of its work. Stage names follow
`[a-z0-9-]+`, dataset first, zero-padded step counts: `digits-pd-s0004-fid`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sferd.metrics import keys
from sferd.spec.models import (CfdMethod, ChainFields, EvaluationSpec, ExternalTeacherSpec, PredictorSpec,
                               PretrainedClassifierSpec, SferdPDMethod, Spec)

RESULTS = "results"
METRICS_DIR = f"{RESULTS}/metrics"
TABLES_DIR = f"{RESULTS}/tables"


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # the stage-runner module under sferd.pipeline.stages
    params: dict[str, Any]  # fully resolved; JSON/YAML-serialisable; includes inputs/outputs
    deps: tuple[str, ...]  # upstream outputs this stage reads
    outs: tuple[str, ...]  # cached outputs (files or directories)
    # keep outs between runs. No stage sets it: resumable training state lives in a git-ignored scratch folder, not
    # in DVC outputs, so outputs are written once, complete, and need no persisting.
    persist: bool = False
    metrics: tuple[str, ...] = ()  # small JSON, tracked by git (cache: false)
    uncached_outs: tuple[str, ...] = ()  # rendered tables: in git, not in the DVC cache
    plots: tuple[tuple[str, dict[str, Any]], ...] = ()  # (path, dvc plot props): in git, for `dvc plots`
    cost: dict[str, float] = field(default_factory=dict)  # estimated work, for `plan`
    # the DVC stage this one runs inside when the spec's stage_granularity is `row` (see `bundle`); not part of the
    # stage's definition: the same stage in two specs is the same stage whichever way each groups it
    group: str | None = field(default=None, compare=False)


def steps_tag(steps: int) -> str:
    return f"s{steps:04d}"


def stage_dir(name: str) -> str:
    return f"{RESULTS}/{name}"


def metrics_path(name: str) -> str:
    return f"{METRICS_DIR}/{name}.json"


def _model_config(spec: Spec, *, dropout: float | None = None) -> dict[str, Any]:
    """The network the runner builds: U-Net fields + data shape + output channels."""
    m = spec.teacher.model.model_dump(mode="json")
    if dropout is not None:
        m["dropout"] = dropout
    channels = spec.dataset.channels
    m["in_channels"] = channels
    m["out_channels"] = 2 * channels if spec.teacher.parameterization == "both" else channels
    m["resolution"] = spec.dataset.resolution
    m["num_classes"] = spec.dataset.num_classes if m.pop("class_conditional") else None
    return m


def stage_prefix(spec: Spec) -> str:
    """Dataset first; a spec loaded at a scale profile gets its own names (`cifar10-smoke-teacher`)."""
    return spec.dataset.short if spec.scale is None else f"{spec.dataset.short}-{spec.scale}"


@dataclass(frozen=True)
class GraphContext:
    """What a builder of a non-chain method (sferd/pipeline/graph_<kind>.py) needs from the graph built so far."""

    spec: Spec
    prefix: str  # stage_prefix(spec)
    dataset: dict[str, Any]  # the dataset's params (without `source`)
    data_dir: str
    train_split: str
    heldout_split: str
    teacher_dir: str  # the spec's teacher (trained or imported): <dir>/model.pt
    teacher_model: dict[str, Any]
    student_model: dict[str, Any]
    by_row: bool  # stage_granularity == "row": give stages a `group`
    student_dir: Callable[[Any, int, int], str]  # (chain method, steps, seed) → its student's folder
    add_stage: Callable[[Stage], None]
    # add_fid(name, row, label, steps, source, deps, nfe_per_sample, seed=None, group=None): one FID stage + table row;
    # source["kind"] picks the runner (`sferd` → fid_sferd, `model`/`heldout`/`noise` → fid, else fid_<kind>)
    add_fid: Callable[..., None]
    # scratch space a builder keeps across the methods of one graph (e.g. stages two methods share: key → name)
    shared: dict[str, Any] = field(default_factory=dict)


def non_chain_builders() -> dict[str, Callable[[GraphContext, Any], None]]:
    """Method kind → builder of its stages, for methods that are not progressive-distillation chains."""
    from sferd.pipeline.graph_cld import build_cld  # its own modules; imported here, as they import this one
    from sferd.pipeline.graph_solver import build_solver

    return {"solver": build_solver, "cld": build_cld}


def build_graph(spec: Spec, *, spec_path: str) -> list[Stage]:
    p = stage_prefix(spec)
    # `source` (where downloaded files live) matters to the data stage only: moving the files must not
    # retrain anything downstream, whose inputs are the data stage's outputs.
    ds = spec.dataset.model_dump(mode="json", exclude={"source"})
    stages: list[Stage] = []
    by_row = spec.stage_granularity == "row"

    def grouped(parts: list[Stage], group: str) -> list[Stage]:
        return [replace(st, group=group) for st in parts] if by_row else parts

    # ---- data
    data_name = f"{p}-data"
    data_dir = stage_dir(data_name)
    train_split, heldout_split = f"{data_dir}/train", f"{data_dir}/heldout"  # split folders (sferd/data/store.py)
    n_train_hint = 1797  # only used by cost estimates for digits
    stages.append(
        Stage(
            name=data_name,
            kind="data",
            params={"kind": "data", "dataset": ds, "outputs": {"dir": data_dir},
                    **({"source": spec.dataset.source.model_dump(mode="json")} if spec.dataset.source else {})},
            deps=(),
            outs=(data_dir,),
            cost={"images": n_train_hint},
        )
    )

    # ---- FID feature network (quickstart)
    feat_weights: str | None = None
    feat_version: str | None = None  # the fixed weights' version, recorded by every FID stage (table footer)
    feat_deps: tuple[str, ...] = ()
    if spec.features is not None:
        feat_name = f"{p}-features"
        feat_dir = stage_dir(feat_name)
        feat_weights = f"{feat_dir}/model.pt"
        feat_deps = (feat_dir,)
        f = spec.features
        weights = f.weights.model_dump(mode="json") if f.weights is not None else None
        stages.append(
            Stage(
                name=feat_name,
                kind="features",
                params={
                    "kind": "features",
                    "seed": spec.seed,
                    "precision": spec.precision,
                    "dataset": ds,
                    "network": f.model_dump(mode="json", exclude={"weights"}),
                    # fixed versioned weights: verified, not trained (sferd/pipeline/stages/features.py); only when
                    # given, so a spec that trains its network keeps its params (and DVC cache)
                    **({"weights": weights} if weights is not None else {}),
                    "inputs": {"train": train_split, "heldout": heldout_split},
                    "outputs": {"dir": feat_dir, "metrics": metrics_path(feat_name)},
                },
                # the weights file itself is a dep: replacing it re-runs the stage (and the stage refuses it unless
                # the spec's sha256 was changed too)
                deps=(data_dir, *((f.weights.path,) if f.weights is not None else ())),
                outs=(feat_dir,),
                metrics=(metrics_path(feat_name),),
                # verifying costs two passes over the data; training 3 passes per image per update
                cost={"forward_passes": 0.0 if f.weights is not None else 3.0 * f.updates * f.batch_size},
            )
        )
        if f.weights is not None:
            feat_version = f.weights.version

    # ---- teacher
    t = spec.teacher
    teacher_name = f"{p}-teacher"
    teacher_dir = stage_dir(teacher_name)
    teacher_model = _model_config(spec)
    student_model = _model_config(spec, dropout=0.0)  # PD: students train without dropout
    if isinstance(t, ExternalTeacherSpec):
        # imported, not trained: the stage checks the hash and the architecture, then writes the usual model.pt
        stages.append(
            Stage(
                name=teacher_name,
                kind="teacher_import",
                params={
                    "kind": "teacher_import",
                    "model": teacher_model,
                    "source": {"path": t.path, "sha256": t.sha256},
                    "parameterization": t.parameterization,
                    "outputs": {"dir": teacher_dir, "metrics": metrics_path(teacher_name)},
                },
                deps=(),
                outs=(teacher_dir,),
                metrics=(metrics_path(teacher_name),),
                cost={},
            )
        )
    else:
        stages.append(
            Stage(
                name=teacher_name,
                kind="teacher",
                params={
                    "kind": "teacher",
                    "seed": spec.seed,
                    "precision": spec.precision,
                    "dataset": ds,
                    "model": teacher_model,
                    "training": t.model_dump(mode="json", exclude={"model", "kind"}),
                    "inputs": {"train": train_split},
                    "outputs": {"dir": teacher_dir, "metrics": metrics_path(teacher_name)},
                },
                deps=(data_dir,),
                outs=(teacher_dir,),
                metrics=(metrics_path(teacher_name),),
                cost={"forward_passes": 3.0 * t.updates * t.batch_size},
            )
        )

    # ---- CFD classifiers: one stage per distinct classifier block, named after the first method that needs it
    classifier_of: dict[str, dict[str, Any]] = {}  # method name → what its CFD halvings read
    known_classifiers: dict[str, str] = {}  # canonical classifier params → stage name
    for method in spec.methods:
        if not isinstance(method, CfdMethod):
            continue
        cls_stage = _classifier_stage(spec, method, data_dir, train_split, heldout_split)
        key = json.dumps({k: v for k, v in cls_stage.params.items() if k != "outputs"}, sort_keys=True)
        if key not in known_classifiers:
            known_classifiers[key] = cls_stage.name
            stages.append(cls_stage)
        cls_dir = stage_dir(known_classifiers[key])
        classifier_of[method.name] = {"dir": cls_dir, "checkpoint": f"{cls_dir}/classifier.pt",
                                      "network": cls_stage.params["network"]}

    # ---- distillation chains, deduplicated per halving: a halving is identified by its chain settings, guidance,
    # seed, where the chain starts, and which of the halvings up to it are CFD halvings (with their settings). So
    # methods whose chains are identical share one set of stages, named after the first method that needs it (e.g.
    # PD and "SFERD, predictor only"), and a CFD chain shares with a PD chain of the same settings exactly its plain
    # PD halvings before its first CFD halving (from there on the two chains' students differ).
    # Every chain, and what hangs off it, is repeated per seed of `seeds` (the teacher is trained once).
    # A chain with `start_from` begins at another chain's student (validated: an earlier method that produces
    # start_steps), so an ablation trains only its own last halvings.
    halving_dir: dict[tuple[str, int, int], str] = {}  # (method name, student steps, seed) → its student's folder

    def chain_start(method, seed: int) -> tuple[str, dict[str, Any]]:
        """T at the chain start: the spec's teacher, or the student this chain branches from."""
        if method.start_from is None:
            return teacher_dir, teacher_model
        return halving_dir[(method.start_from, method.start_steps, seed)], student_model

    known: dict[str, str] = {}  # canonical halving identity → stage name
    for method in spec.methods:
        if not isinstance(method, ChainFields):  # samplers of the teacher, CLD: built by NON_CHAIN_BUILDERS below
            continue
        guidance = method.guidance.model_dump(mode="json") if method.guidance is not None else None
        cfd_steps = set(method.cfd_student_steps) if isinstance(method, CfdMethod) else set()
        for seed in spec.chain_seeds:
            start = chain_start(method, seed)
            prev_dir, prev_model = start
            prev_is_teacher = method.start_from is None
            history: list[dict[str, Any] | None] = []
            chain_stages: list[Stage] = []
            for steps in method.student_steps():
                cfd = _cfd_block(method, classifier_of[method.name]) if steps in cfd_steps else None
                history.append(cfd)
                key = json.dumps({"chain": method.chain_params(), "guidance": guidance, "seed": seed,
                                  "start": start[0], "cfd": history}, sort_keys=True)
                if key not in known:
                    known[key] = f"{p}-{method.name}{seed_tag(spec, seed)}-{steps_tag(steps)}"
                    chain_stages.append(_halving(spec, method, guidance, (prev_dir, prev_model), prev_is_teacher,
                                                 student_model, train_split, seed, steps, known[key], cfd))
                halving_dir[(method.name, steps, seed)] = prev_dir = stage_dir(known[key])
                prev_model, prev_is_teacher = student_model, False
            stages.extend(grouped(chain_stages, f"{p}-{method.name}{seed_tag(spec, seed)}-chain"))

    def student_dir(method, steps: int, seed: int) -> str:
        return halving_dir[(method.name, steps, seed)]

    def teacher_of(method, steps: int, seed: int) -> tuple[str, dict[str, Any]]:
        """T_2K: the chain's previous student, or the chain's first teacher at its start."""
        if 2 * steps == method.start_steps:
            return chain_start(method, seed)
        return student_dir(method, 2 * steps, seed), student_model

    # ---- SFERD stages (b) predictor and (c) latent prior, per evaluated student (D5)
    sferd_ckpts: dict[tuple[str, int, int], tuple[str, str]] = {}
    for method in spec.methods:
        if not isinstance(method, SferdPDMethod) or method.predictor is None:
            continue
        pred, prior = method.predictor, method.prior
        assert prior is not None  # validated
        encoder = encoder_config(spec.dataset.resolution, spec.dataset.channels, pred)
        for seed in spec.chain_seeds:
            sgp_group = f"{p}-{method.name}{seed_tag(spec, seed)}-predictor-prior"
            for steps in spec.evaluation.student_steps:
                base = f"{p}-{method.name}{seed_tag(spec, seed)}-{steps_tag(steps)}"
                pred_name, prior_name = f"{base}-predictor", f"{base}-prior"
                pred_dir, prior_dir = stage_dir(pred_name), stage_dir(prior_name)
                t_dir, t_model = teacher_of(method, steps, seed)
                s_dir = student_dir(method, steps, seed)
                teacher_passes = 4 if method.guidance is not None else 2
                stages.append(
                    Stage(
                        name=pred_name,
                        kind="predictor",
                        params={
                            "kind": "predictor",
                            "seed": seed,
                            "precision": spec.precision,
                            "dataset": ds,
                            "student_steps": steps,
                            "student": {"checkpoint": f"{s_dir}/model.pt", "model": student_model},
                            "teacher": {"checkpoint": f"{t_dir}/model.pt", "model": t_model},
                            "guidance": method.guidance.model_dump(mode="json") if method.guidance is not None else None,
                            "parameterization": t.parameterization,
                            "loss_weighting": t.loss_weighting,
                            "encoder": encoder,
                            "predictor": pred.model_dump(mode="json"),
                            "inputs": {"train": train_split},
                            "outputs": {"dir": pred_dir, "metrics": metrics_path(pred_name)},
                        },
                        deps=(data_dir, s_dir, t_dir),
                        outs=(pred_dir,),
                                metrics=(metrics_path(pred_name),),
                        cost={"forward_passes": float((teacher_passes + 4) * pred.updates * pred.batch_size)},
                        group=sgp_group if by_row else None,
                    )
                )
                stages.append(
                    Stage(
                        name=prior_name,
                        kind="prior",
                        params={
                            "kind": "prior",
                            "seed": seed,
                            "precision": spec.precision,
                            "dataset": ds,
                            "predictor": {"checkpoint": f"{pred_dir}/predictor.pt", "encoder": encoder},
                            "num_classes": student_model["num_classes"],
                            "prior": prior.model_dump(mode="json"),
                            "inputs": {"train": train_split},
                            "outputs": {"dir": prior_dir, "metrics": metrics_path(prior_name)},
                        },
                        deps=(data_dir, pred_dir),
                        outs=(prior_dir,),
                                metrics=(metrics_path(prior_name),),
                        cost={"mlp_passes": float(3 * prior.updates * prior.batch_size)},
                        group=sgp_group if by_row else None,
                    )
                )
                sferd_ckpts[(method.name, steps, seed)] = (pred_dir, prior_dir)

    # ---- FID
    ev = spec.evaluation
    if feat_weights is None:  # Inception: the spec's local file, or None for torch hub's cache
        feat_weights = ev.feature_weights
    # reference statistics once, not per FID stage (the reference is the whole training set)
    ref_name = f"{p}-reference-stats"
    ref_dir = stage_dir(ref_name)
    reference = {"name": f"{spec.dataset.id}-{ev.reference}", "path": train_split}
    stages.append(
        Stage(
            name=ref_name,
            kind="reference",
            params={"kind": "reference", "feature_extractor": ev.feature_extractor, "feature_weights": feat_weights,
                    "reference": reference, "batch_size": ev.sample_batch_size, "outputs": {"dir": ref_dir}},
            deps=(data_dir, *feat_deps),
            outs=(ref_dir,),
            cost={},
        )
    )
    fid_common = {
        "num_samples": ev.num_samples,
        "sample_seed_start": ev.sample_seed_start,
        "sample_batch_size": ev.sample_batch_size,
        "feature_extractor": ev.feature_extractor,
        "feature_weights": feat_weights,
        "reference": {**reference, "stats_dir": ref_dir},
        "image_shape": [spec.dataset.channels, spec.dataset.resolution, spec.dataset.resolution],
        "dataset": ds,
    }
    if feat_version is not None:  # absent without fixed weights, so those specs keep their params (and DVC cache)
        fid_common["feature_weights_version"] = feat_version
    extra = extra_metrics(ev)
    if extra:  # absent at the default, so specs without extra metrics keep their params (and DVC cache)
        fid_common["extra_metrics"] = extra
    fid_rows: list[dict[str, Any]] = []
    fid_of: dict[str, dict[str, Any]] = {}  # FID stage identity → its table row

    def add_fid(name: str, row: str, label: str, steps: int | None, source: dict[str, Any], deps: tuple[str, ...],
                nfe_per_sample: int, seed: int | None = None, group: str | None = None) -> None:
        # the same student checkpoint twice (a CFD chain's 8-step student is its PD chain's): one FID stage, two
        # table rows. Only for plain model sources: a solver row asking for the same fit keeps its own FID stages.
        same = json.dumps({"source": source, "steps": steps, "seed": seed}, sort_keys=True)
        if source["kind"] == "model" and same in fid_of:
            first = fid_of[same]
            fid_rows.append({**first, "row": row, "label": label})
            return
        out_dir = stage_dir(name)
        kind = "fid" if source["kind"] in ("model", "heldout", "noise") else f"fid_{source['kind']}"
        stages.append(
            Stage(
                name=name,
                kind=kind,
                # no spec path here: the same FID stage (teacher, calibration) may serve several specs
                params={
                    "kind": kind,
                    "row": row,
                    "steps": steps,
                    "source": source,
                    **fid_common,
                    "outputs": {"dir": out_dir, "metrics": metrics_path(name)},
                },
                deps=(data_dir, *feat_deps, ref_dir, *deps),
                outs=(out_dir,),
                metrics=(metrics_path(name),),
                cost={"forward_passes": float(ev.num_samples * nfe_per_sample)},
                group=group if by_row else None,
            )
        )
        fid_rows.append({"row": row, "label": label, "steps": steps, "seed": seed, "metrics": metrics_path(name),
                         "samples": f"{out_dir}/samples.npz", "name": name})
        fid_of[same] = fid_rows[-1]

    for steps in ev.teacher_steps:
        add_fid(
            f"{p}-teacher-{steps_tag(steps)}-fid", "teacher", "Teacher (DDIM, no distillation)", steps,
            {"kind": "model", "checkpoint": f"{teacher_dir}/model.pt", "model": teacher_model,
             "parameterization": t.parameterization},
            (teacher_dir,), steps, group=f"{p}-teacher-fid",
        )
    for method in spec.methods:
        if not isinstance(method, ChainFields):
            continue
        for seed in spec.chain_seeds:
            for steps in ev.student_steps:
                ckpt_dir = student_dir(method, steps, seed)
                source: dict[str, Any] = {"kind": "model", "checkpoint": f"{ckpt_dir}/model.pt", "model": student_model,
                                          "parameterization": t.parameterization}
                deps: tuple[str, ...] = (ckpt_dir,)
                nfe = steps
                if (method.name, steps, seed) in sferd_ckpts:
                    pred_dir, prior_dir = sferd_ckpts[(method.name, steps, seed)]
                    pred, prior = method.predictor, method.prior
                    source = {
                        **source,
                        "kind": "sferd",
                        "predictor": {"checkpoint": f"{pred_dir}/predictor.pt", "latent_dim": pred.latent_dim,
                                      "init_from_student": pred.init_from_student,
                                      "shift_cutoff_fraction": pred.shift_cutoff_fraction,
                                      "shift_parameterization": pred.shift_parameterization},
                        "prior": {"checkpoint": f"{prior_dir}/prior.pt", "sampling_steps": prior.sampling_steps,
                                  "clip_noise": prior.clip_noise, "clip_x0": prior.clip_x0},
                    }
                    deps = (ckpt_dir, pred_dir, prior_dir)
                    nfe = 2 * steps  # student + predictor branch (about one decoder pass) per step, upper bound
                add_fid(f"{p}-{method.name}{seed_tag(spec, seed)}-{steps_tag(steps)}-fid", method.name, method.label,
                        steps, source, deps, nfe, seed, group=f"{p}-{method.name}{seed_tag(spec, seed)}-fid")
    # ---- methods that are not distillation chains: each kind's own builder adds its stages and FID rows
    ctx = GraphContext(spec=spec, prefix=p, dataset=ds, data_dir=data_dir, train_split=train_split,
                       heldout_split=heldout_split, teacher_dir=teacher_dir, teacher_model=teacher_model,
                       student_model=student_model, by_row=by_row, student_dir=student_dir, add_stage=stages.append,
                       add_fid=add_fid)
    for method in spec.methods:
        if not isinstance(method, ChainFields):
            non_chain_builders()[method.kind](ctx, method)

    for cal in ev.calibration:
        if cal == "heldout":
            add_fid(f"{p}-heldout-fid", "heldout", "Held-out data (floor)", None,
                    {"kind": "heldout", "path": heldout_split}, (), 0, group=f"{p}-calibration-fid")
        else:
            add_fid(f"{p}-noise-fid", "noise", "Gaussian noise (ceiling)", None, {"kind": "noise"}, (), 0,
                    group=f"{p}-calibration-fid")

    # ---- render
    table = spec.table
    render_name = f"{table.id}-render"
    md = f"{TABLES_DIR}/{table.id}.md"
    png, csv, grids = f"{TABLES_DIR}/{table.id}-fid.png", f"{TABLES_DIR}/{table.id}-fid.csv", f"{TABLES_DIR}/{table.id}-samples"
    # paired differences only when asked for: a table without them keeps its render params (and DVC state) as it was
    paired = {"paired": f"{TABLES_DIR}/{table.id}-paired.csv"} if table.paired_against is not None else {}
    stages.append(
        Stage(
            name=render_name,
            kind="render",
            params={
                "kind": "render",
                "spec": spec_path,
                "table": table.model_dump(mode="json", exclude=None if paired else {"paired_against"}),
                "rows": fid_rows,
                "reported": [r.model_dump(mode="json") for r in spec.reported],
                **({"extra_metrics": list(extra)} if extra else {}),
                # only when scaled: the paper-scale render params (and so their committed pipelines) stay as they are
                **({"scale": {"name": spec.scale, "description": spec.scales[spec.scale].description,
                              "set": spec.scales[spec.scale].model_dump(mode="json")["set"]}}
                   if spec.scale is not None else {}),
                "outputs": {"markdown": md, "plot": png, "plot_data": csv, "grids": grids, **paired},
            },
            # metrics for the table, the FID stages' folders for the sample grids
            deps=tuple(dict.fromkeys(r["metrics"] for r in fid_rows)) + tuple(dict.fromkeys(stage_dir(r["name"])
                                                                                       for r in fid_rows)),
            outs=(),
            uncached_outs=(md, png, grids, *paired.values()),
            plots=((csv, {"cache": False, "x": "steps", "y": "fid", "template": "scatter",
                          "title": f"{table.title}", "x_label": "sampling steps", "y_label": "FID"}),),
            cost={},
        )
    )
    return [with_training_log(s) for s in stages]


TRAINING_KINDS = frozenset({"features", "teacher", "distill", "distill_cfd", "predictor", "prior", "cld_teacher",
                            "classifier"})


def training_log_path(name: str) -> str:
    return f"{METRICS_DIR}/{name}-train.tsv"


def with_training_log(stage: Stage) -> Stage:
    """A training stage also writes its per-update log (loss, gradient norm, lr, images/s), declared as a DVC plot
    beside its metrics: uncached and not a dependency of anything, since its timings differ on every run."""
    if stage.kind not in TRAINING_KINDS or stage.params.get("weights") is not None:  # fixed weights: no training
        return stage
    log = training_log_path(stage.name)
    params = {**stage.params, "outputs": {**stage.params["outputs"], "train_log": log}}
    plot = (log, {"cache": False, "x": "update", "y": "loss", "template": "linear",
                  "title": f"{stage.name}: training loss", "x_label": "update", "y_label": "loss"})
    return replace(stage, params=params, plots=(*stage.plots, plot))


def extra_metrics(ev: EvaluationSpec) -> dict[str, dict[str, int]]:
    """Each requested metric beyond FID → the torch-fidelity settings its stage uses, in a fixed order (so the
    order in which a spec lists its metrics does not change any stage's params)."""
    settings = {
        keys.METRIC_ISC: {"splits": keys.ISC_SPLITS_DEFAULT},
        keys.METRIC_PRC: {"neighborhood": keys.PRC_NEIGHBORHOOD_DEFAULT},
    }
    return {m: settings[m] for m in keys.METRIC_OPTIONS if m != keys.METRIC_FID and m in ev.metrics}


def encoder_config(resolution: int, channels: int, pred: PredictorSpec) -> dict[str, Any]:
    """Resolved semantic-encoder architecture (sferd-method.md §7, D13): stride-2 convs down to 4×4, one
    attention block on the 16×16 map when there is one."""
    convs = list(pred.encoder_channels) if pred.encoder_channels is not None else list(ENCODER_CHANNELS[resolution])
    sizes = [resolution >> (k + 1) for k in range(len(convs))]
    attention_after = sizes.index(16) + 1 if 16 in sizes else None
    return {"in_channels": channels, "resolution": resolution, "channels": convs,
            "attention_after": attention_after, "latent_dim": pred.latent_dim}


# D13 and PDAE's encoders; 8 and 16 px are project choices for the digits quickstart.
ENCODER_CHANNELS: dict[int, tuple[int, ...]] = {
    8: (64,), 16: (64, 128), 32: (64, 128, 128), 64: (64, 128, 128, 128), 128: (64, 128, 256, 256, 256),
}


def seed_tag(spec: Spec, seed: int) -> str:
    """Stage-name tag of a chain replicate: none for the spec's own `seed`, so adding seeds keeps every existing
    stage (and its cache) as it is."""
    return "" if seed == spec.seed else f"-seed{seed:04d}"


def _cfd_block(method: CfdMethod, classifier: dict[str, Any]) -> dict[str, Any]:
    """What a CFD halving's stage reads beyond a PD halving's: the classifier and the loss settings."""
    return {"classifier": {"checkpoint": classifier["checkpoint"], "network": classifier["network"]},
            **method.cfd_params()}


def _classifier_stage(spec: Spec, method: CfdMethod, data_dir: str, train_split: str, heldout_split: str) -> Stage:
    """CFD's frozen classifier: trained on the training split, or verified from a local pretrained file."""
    p = stage_prefix(spec)
    name = f"{p}-{method.name}-classifier"
    d = stage_dir(name)
    ds = spec.dataset
    c = method.classifier
    if isinstance(c, PretrainedClassifierSpec):
        network = {"architecture": c.base, "channels": ds.channels, "resolution": ds.resolution,
                   "num_classes": c.num_classes, "pretrained": True, "input_resolution": c.input_resolution}
        mode: dict[str, Any] = {"weights": {"path": c.path, "sha256": c.sha256}}
        deps: tuple[str, ...] = (data_dir, c.path)
        cost: dict[str, float] = {}
    else:
        network = {"architecture": c.architecture, "channels": ds.channels, "resolution": ds.resolution,
                   "num_classes": ds.num_classes, "pretrained": False}
        if c.architecture == "digits-cnn":
            network.update(width=c.width or 32, feature_dim=c.feature_dim or 64)
        mode = {"seed": c.seed, "precision": spec.precision,
                "training": c.model_dump(mode="json", exclude={"architecture", "seed", "width", "feature_dim"})}
        deps = (data_dir,)
        # classifier passes, not U-Net passes: `plan` prices forward_passes at the teacher U-Net's FLOPs
        cost = {"classifier_passes": 3.0 * c.updates * c.batch_size}
    return Stage(
        name=name,
        kind="classifier",
        params={"kind": "classifier", "dataset": spec.dataset.model_dump(mode="json", exclude={"source"}),
                "num_classes": ds.num_classes, "network": network, **mode,
                "inputs": {"train": train_split, "heldout": heldout_split},
                "outputs": {"dir": d, "metrics": metrics_path(name)}},
        deps=deps,
        outs=(d,),
        metrics=(metrics_path(name),),
        cost=cost,
    )


def _halving(
    spec: Spec,
    method: ChainFields,
    guidance: dict[str, Any] | None,
    prev: tuple[str, dict[str, Any]],
    prev_is_teacher: bool,
    student_model: dict[str, Any],
    train_split: str,
    seed: int,
    steps: int,
    name: str,
    cfd: dict[str, Any] | None,
) -> Stage:
    """One halving from `prev` (checkpoint folder and network of its teacher) to a `steps`-step student."""
    p = stage_prefix(spec)
    t = spec.teacher
    prev_dir, prev_model = prev
    teacher_passes = 2 if guidance is None else 4  # guidance: a second pass per teacher evaluation
    d = stage_dir(name)
    updates = method.updates_for(steps)
    # a CFD halving has its own runner (distill_cfd), so plain halvings do not depend on the CFD code: an edit of the
    # classifier loss must not re-run every PD and SFERD halving (code deps follow a kind's imports)
    kind = "distill_cfd" if cfd is not None else "distill"
    return Stage(
        name=name,
        kind=kind,
        params={
            "kind": kind,
            "seed": seed,
            "precision": spec.precision,
            "dataset": spec.dataset.model_dump(mode="json", exclude={"source"}),
            "student_steps": steps,
            "teacher": {
                "checkpoint": f"{prev_dir}/model.pt",
                "model": prev_model,
                # the first halving distils the teacher's EMA weights; later ones the previous student
                "is_original_teacher": prev_is_teacher,
            },
            # SFERD: every teacher of the chain (original and students) is attention-guided (§6)
            "guidance": guidance,
            "model": student_model,
            "parameterization": t.parameterization,
            "loss_weighting": t.loss_weighting,
            "training": {
                "updates": updates,
                "batch_size": method.batch_size,
                "lr": method.lr,
                "grad_clip_norm": method.grad_clip_norm,
                "checkpoint_every_updates": method.checkpoint_every_updates,
            },
            # CFD halvings only (sferd/methods/cfd.py): PD and SFERD halvings keep their params as they were
            **({"cfd": cfd} if cfd is not None else {}),
            "inputs": {"train": train_split},
            "outputs": {"dir": d, "metrics": metrics_path(name)},
        },
        deps=(stage_dir(f"{p}-data"), prev_dir, *((stage_dir_of(cfd["classifier"]["checkpoint"]),) if cfd else ())),
        outs=(d,),
        metrics=(metrics_path(name),),
        # teacher forwards + 1 student forward/backward (≈ 3 forwards) per example; CFD: + two classifier forwards
        # and a backward to the input (≈ 4 classifier passes), counted apart (a classifier is not a U-Net)
        cost={"forward_passes": float((teacher_passes + 3) * updates * method.batch_size),
              **({"classifier_passes": float(4 * updates * method.batch_size)} if cfd is not None else {})},
    )


def stage_dir_of(path: str) -> str:
    """The stage folder holding a file of it (`results/<stage>/classifier.pt` → `results/<stage>`)."""
    return path.rsplit("/", 1)[0]


BUNDLE_KIND = "bundle"


def bundle(homed: list[tuple[str, Stage]]) -> list[tuple[str, Stage]]:
    """(pipeline, stage) pairs → the DVC stages to write: the stages of one `group` become one stage of kind
    `bundle` that runs them in graph order in one process (sferd/pipeline/run.py). Each part keeps its own params,
    outputs, metrics, scratch folder and resume state, so a bundle computes exactly what its parts compute alone;
    only the DVC bookkeeping is coarser (a changed part re-runs its whole bundle).

    A group forms in the pipeline that holds its first part; a part that another pipeline owns (a stage two specs
    define identically) stays a stage of its own there, so no stage name or output is ever written twice.
    A bundle's deps are its parts' deps less what earlier parts produce; the order of the result is a valid run
    order (a bundle sits where its last part was, and a stable topological sort settles the rest).
    """
    first_home: dict[str, str] = {}
    for pipeline, st in homed:
        if st.group is not None:
            first_home.setdefault(st.group, pipeline)
    members: dict[tuple[str, str], list[Stage]] = {}
    for pipeline, st in homed:
        if st.group is not None and first_home[st.group] == pipeline:
            members.setdefault((pipeline, st.group), []).append(st)
    out: list[tuple[str, Stage]] = []
    last_of = {(pl, g): parts[-1].name for (pl, g), parts in members.items()}
    for pipeline, st in homed:
        key = (pipeline, st.group) if st.group is not None else None
        if key is None or key not in members or len(members[key]) == 1:
            out.append((pipeline, replace(st, group=None)))
        elif last_of[key] == st.name:
            out.append((pipeline, _bundle_stage(st.group, members[key])))
    return _run_order(out)


def _bundle_stage(name: str, parts: list[Stage]) -> Stage:
    produced: set[str] = set()
    deps: list[str] = []
    for st in parts:
        deps.extend(d for d in st.deps if d not in produced and d not in deps)
        produced.update((*st.outs, *st.metrics))
    cost: dict[str, float] = {}
    for st in parts:
        for k, v in st.cost.items():
            cost[k] = cost.get(k, 0.0) + v
    return Stage(
        name=name,
        kind=BUNDLE_KIND,
        params={"kind": BUNDLE_KIND, "parts": [{"name": st.name, "params": st.params} for st in parts]},
        deps=tuple(deps),
        outs=tuple(o for st in parts for o in st.outs),
        metrics=tuple(m for st in parts for m in st.metrics),
        uncached_outs=tuple(o for st in parts for o in st.uncached_outs),
        plots=tuple(pl for st in parts for pl in st.plots),
        cost=cost,
    )


def bundle_parts(stage: Stage) -> list[tuple[str, str]]:
    """(name, kind) of what a DVC stage runs: its parts for a bundle, else itself."""
    if stage.kind != BUNDLE_KIND:
        return [(stage.name, stage.kind)]
    return [(p["name"], p["params"]["kind"]) for p in stage.params["parts"]]


def _run_order(items: list[tuple[str, Stage]]) -> list[tuple[str, Stage]]:
    """Stable topological sort by outputs → deps (Kahn, always taking the earliest ready item)."""
    producer: dict[str, int] = {}
    for i, (_, st) in enumerate(items):
        for o in (*st.outs, *st.metrics, *st.uncached_outs):
            producer[o] = i
    needs = [{producer[d] for d in st.deps if d in producer and producer[d] != i} for i, (_, st) in enumerate(items)]
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(items):
        ready = next((i for i in range(len(items)) if i not in done and needs[i] <= done), None)
        if ready is None:  # a cycle cannot come from a spec graph; fail loudly rather than write a broken pipeline
            raise ValueError("stage bundles depend on each other in a cycle")
        done.add(ready)
        order.append(ready)
    return [items[i] for i in order]
