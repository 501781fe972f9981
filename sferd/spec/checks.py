"""Semantic checks that need several fields at once (DESIGN.md "How a spec becomes results", step 1).

Pydantic field validators catch local mistakes; the rules here relate parts of the spec (an evaluated step
count must be produced by each chain, attention must sit at a resolution the U-Net has, …). Each rule
returns the location of the offending value so the CLI prints file:line:col like any other error.
"""

from __future__ import annotations

import math

from sferd.metrics import keys
from sferd.spec.models import (CIFAR_ARCHITECTURES, DODE_SAMPLERS, MAX_STEPS, ORDERED_SAMPLERS, CfdMethod,
                               ChainFields, CLDMethod, EvaluationSpec, PretrainedClassifierSpec, SferdPDMethod,
                               SolverMethod, Spec, UNetSpec)

Problem = tuple[tuple[str | int, ...], str]

ENCODER_NORM_GROUPS = 32  # PDAE's encoder GroupNorm; sferd.nn.predictor uses the same


def attention_blocks(model: UNetSpec, resolution: int) -> list[tuple[str, int, int]]:
    """(part, resolution, index) of every attention block, in execution order, without building the network.

    Mirrors `sferd.nn.unet.UNetConfig.attention_blocks` (a test keeps the two equal); duplicated so that
    validation never imports torch.
    """
    levels = model.resolutions(resolution)
    attn = set(model.attention_resolutions)
    blocks: list[tuple[str, int, int]] = []
    for res in levels:
        if res in attn:
            blocks += [("encoder", res, i) for i in range(model.num_res_blocks)]
    blocks.append(("middle", levels[-1], 0))
    for res in reversed(levels):
        if res in attn:
            blocks += [("decoder", res, i) for i in range(model.num_res_blocks + 1)]
    return blocks


def _check_sferd(spec: Spec, m: int, method: SferdPDMethod) -> list[Problem]:
    problems: list[Problem] = []
    res = spec.dataset.resolution
    if method.guidance is not None:
        ref = method.guidance.attention_block
        blocks = attention_blocks(spec.teacher.model, res)
        found = [i for p, r, i in blocks if p == ref.part and r == ref.resolution]
        listing = ", ".join(f"{p} {r}×{r} #{i}" for p, r, i in blocks)
        if not found:
            problems.append(((("methods", m, "guidance", "attention_block", "resolution")),
                             f"the teacher U-Net has no {ref.part} attention block at {ref.resolution}×{ref.resolution} (it has: {listing})"))
        elif isinstance(ref.position, int) and ref.position not in found:
            problems.append(((("methods", m, "guidance", "attention_block", "position")),
                             f"{ref.part} attention blocks at {ref.resolution}×{ref.resolution} are #{found[0]}..#{found[-1]}"))
        k = method.guidance.blur_kernel_size
        if k > 2 * res - 1:
            # reflect padding needs the half-width below the image size
            problems.append((("methods", m, "guidance", "blur_kernel_size"),
                             f"kernel {k} is too large for {res}×{res} images (at most {2 * res - 1} with reflect padding)"))
    if method.predictor is not None:
        p = method.predictor
        if res < 8 or res & (res - 1):
            problems.append((("methods", m, "predictor"), f"the semantic encoder needs a power-of-two resolution >= 8, got {res}"))
        elif p.encoder_channels is not None and len(p.encoder_channels) != int(math.log2(res // 4)):
            problems.append((("methods", m, "predictor", "encoder_channels"),
                             f"{res}×{res} images need log2({res}/4) = {int(math.log2(res // 4))} stride-2 convs to reach 4×4"))
        if p.latent_dim > 4096:
            problems.append((("methods", m, "predictor", "latent_dim"), f"latent size {p.latent_dim} does not fit (at most 4096)"))
        for k, c in enumerate(p.encoder_channels or []):
            if c % ENCODER_NORM_GROUPS:
                problems.append((("methods", m, "predictor", "encoder_channels", k),
                                 f"{c} channels: must be a multiple of {ENCODER_NORM_GROUPS} (the encoder uses GroupNorm({ENCODER_NORM_GROUPS}), PDAE)"))
    return problems


DIGITS_CNN_CLASSES = 10  # sferd.nn.digits_cnn.NUM_CLASSES (validation imports no torch)


def _check_cfd(spec: Spec, m: int, method: CfdMethod) -> list[Problem]:
    """The classifier must take the dataset's images and, for the coverage term, name its classes."""
    chain = method.student_steps()
    halvings: list[Problem] = [(("methods", m, "cfd_student_steps", k),
                                f"no halving produces a {steps}-step student (chain: {chain})")
                               for k, steps in enumerate(method.cfd_student_steps) if steps not in chain]
    if method.beta > 0 and method.gamma is None:
        halvings.append((("methods", m, "beta"), "beta > 0 needs gamma (the entropy/coverage mix of the dataset term)"))
    if method.beta > 0 and method.coverage_group_size is None:
        # the whole batch as one group works on one process only: with more, or with micro-batches, a rank holds
        # part of the group and the stage stops; the same spec must run unchanged on any number of processes
        halvings.append((("methods", m, "beta"), "beta > 0 needs coverage_group_size (the class-coverage term is "
                         "taken over groups of that many samples, each held whole by one process and micro-batch, "
                         "so the result and the run do not depend on how the batch is split; RCFD: its per-GPU batch)"))
    return halvings + _check_classifier(spec, m, method)


def _check_classifier(spec: Spec, m: int, method: CfdMethod) -> list[Problem]:
    ds = spec.dataset
    c = method.classifier
    where = ("methods", m, "classifier", "architecture")
    shape = f"{ds.id} ({ds.channels} channel{'s' if ds.channels > 1 else ''}, {ds.resolution}×{ds.resolution}, " \
            f"{ds.num_classes} classes)"
    if isinstance(c, PretrainedClassifierSpec):
        problems: list[Problem] = []
        if ds.channels != 3:
            problems.append((where, f"an ImageNet-pretrained {c.base} takes RGB images; {shape} does not match"))
        if c.input_resolution < ds.resolution:
            problems.append((("methods", m, "classifier", "input_resolution"),
                             f"{c.input_resolution} is below the images' {ds.resolution}×{ds.resolution}: they are "
                             "upsampled to it, never shrunk"))
        if method.beta > 0 and c.num_classes != ds.num_classes:
            problems.append((("methods", m, "classifier", "num_classes"),
                             f"the dataset term measures coverage of the dataset's classes, but the classifier has "
                             f"{c.num_classes} and {shape} does not match; set beta: 0 or use a classifier trained on "
                             "the dataset"))
        return problems
    if c.architecture in CIFAR_ARCHITECTURES and (ds.channels != 3 or ds.resolution != 32):
        return [(where, f"{c.architecture} follows the CIFAR recipe (stem adapted to 32×32 RGB input); {shape} does "
                        "not match: use digits-cnn")]
    if c.architecture == "digits-cnn" and ds.num_classes != DIGITS_CNN_CLASSES:
        return [(where, f"digits-cnn is a {DIGITS_CNN_CLASSES}-class classifier; {shape} does not match")]
    return []


def unet_problems(model: UNetSpec, res: int, where: tuple) -> list[Problem]:
    """A U-Net (VP or CLD teacher) fits the image size: levels divide the resolution, attention sits at a level, and
    the heads split the channels of every attention block (the listed levels and the middle block, the deepest
    level); the U-Net refuses anything else when a stage builds it, which would be a traceback after compile."""
    problems: list[Problem] = []
    levels = model.resolutions(res)
    if res % 2 ** (len(model.channel_mult) - 1):
        problems.append(((*where, "channel_mult"), f"{len(model.channel_mult)} levels need the resolution ({res}) "
                         f"divisible by {2 ** (len(model.channel_mult) - 1)}"))
    for k, r in enumerate(model.attention_resolutions):
        if r not in levels:
            problems.append(((*where, "attention_resolutions", k),
                             f"the U-Net has no {r}×{r} level at {res}×{res} input (levels: {levels})"))
    attn_levels = {k for k, r in enumerate(levels) if r in model.attention_resolutions} | {len(levels) - 1}
    for k in sorted(attn_levels):
        ch = model.base_channels * model.channel_mult[k]
        if model.head_channels is not None and ch % model.head_channels:
            problems.append(((*where, "head_channels"), f"head_channels={model.head_channels} must divide the {ch} "
                             f"channels of the attention block at {levels[k]}×{levels[k]}"))
            break
        if model.head_channels is None and ch % model.num_heads:
            problems.append(((*where, "num_heads"), f"num_heads={model.num_heads} must divide the {ch} channels of "
                             f"the attention block at {levels[k]}×{levels[k]}"))
            break
    return problems


def _check_cld(spec: Spec, m: int, method: CLDMethod, teachers: dict[str, int]) -> list[Problem]:
    """A CLD row: its U-Net fits the data, its gDDIM order is reached at every evaluated NFE, and a teacher name
    shared with an earlier row means the same teacher."""
    problems: list[Problem] = []
    res = spec.dataset.resolution
    model = method.teacher.model
    where = ("methods", m, "teacher", "model")
    problems.extend(unet_problems(model, res, where))
    if model.class_conditional and spec.dataset.num_classes < 2:
        problems.append(((*where, "class_conditional"), f"{spec.dataset.id} has no class labels"))
    order = getattr(method.sampler, "order", None)
    if order is not None:
        source = f"methods.{m}.steps" if method.steps is not None else "evaluation.student_steps"
        for k, nfe in enumerate(method.nfes(spec.evaluation)):
            if order > nfe - 1:
                problems.append((("methods", m, "sampler", "order"),
                                 f"gDDIM order {order} extrapolates through {order + 1} earlier ε's, but at "
                                 f"{nfe} NFE ({source}.{k}) only {nfe} steps are taken: the order is at most "
                                 f"{nfe - 1} there (a row's own `steps` can list only the NFEs it reaches)"))
                break
    first = teachers.setdefault(method.teacher.name, m)
    if first != m and spec.methods[first].teacher.stage_params() != method.teacher.stage_params():
        problems.append((("methods", m, "teacher"),
                         f"CLD teacher {method.teacher.name!r} is defined by methods.{first} with other settings: "
                         "rows sharing a teacher name share its stage (use a YAML anchor), or give it another name"))
    return problems


def _check_solver(spec: Spec, m: int, method: SolverMethod) -> list[Problem]:
    """Sampler/order/calibration combinations of a `kind: solver` row, at every NFE it is evaluated at (gDDIM of
    order q needs q earlier predictions to be reached: N ≥ q + 1 steps, as sferd.diffusion.gddim refuses otherwise;
    D-ODE's teacher must take more steps than the student, on a grid holding the student's times)."""
    at = ("methods", m)
    where = "this row's `steps`" if method.steps is not None else "evaluation.student_steps"
    steps = method.nfes(spec.evaluation)
    problems: list[Problem] = []
    if method.sampler in ORDERED_SAMPLERS:
        if method.order is None:
            problems.append(((*at, "sampler"), f"{method.sampler} needs an `order` (0 is DDIM; gDDIM uses 1–3)"))
        else:
            low = [n for n in steps if method.order > n - 1]
            if low:
                problems.append(((*at, "order"), f"gDDIM order {method.order} needs at least {method.order + 1} "
                                 f"steps (order q extrapolates q earlier predictions), but {where} has "
                                 f"{', '.join(map(str, low))}: lower the order or list only NFEs >= "
                                 f"{method.order + 1} in the row's `steps`"))
    elif method.order is not None:
        problems.append(((*at, "order"), f"{method.sampler} has no order (only gddim and d_gddim do)"))
    cal = method.calibration
    if method.sampler in DODE_SAMPLERS:
        if cal is None:
            problems.append(((*at, "sampler"), f"{method.sampler} needs a `calibration` block (teacher solver, "
                             "factor K or teacher_steps, batch_size, seed) to fit its λ's"))
    elif cal is not None:
        problems.append(((*at, "calibration"), f"{method.sampler} fits no λ's: `calibration` is only for d_ddim and "
                         "d_gddim"))
    if cal is None or method.sampler not in DODE_SAMPLERS:
        return problems
    c_at = (*at, "calibration")
    if cal.teacher_sampler == "gddim" and cal.teacher_order is None:
        problems.append(((*c_at, "teacher_sampler"), "a gddim teacher solver needs a `teacher_order`"))
    if cal.teacher_sampler != "gddim" and cal.teacher_order is not None:
        problems.append(((*c_at, "teacher_order"), f"the {cal.teacher_sampler} teacher solver has no order"))
    if (cal.factor is None) == (cal.teacher_steps is None):
        problems.append((c_at, "give the teacher's steps either as `factor` (K× the student's at every NFE) or as "
                         "`teacher_steps` (one count for every NFE), exactly one of them"))
        return problems
    for n in steps:
        tn = cal.teacher_steps_for(n)
        if cal.teacher_steps is not None:
            if n >= tn:
                problems.append(((*c_at, "teacher_steps"), f"the D-ODE student takes {n} steps at NFE {n} ({where}), "
                                 f"not fewer than the teacher solver's {tn}: the teacher must take more steps"))
                continue
            if tn % n:
                problems.append(((*c_at, "teacher_steps"), f"{tn} teacher steps are not a multiple of the student's "
                                 f"{n} (NFE {n}, {where}): the teacher grid must hold the student's times"))
                continue
        elif tn > MAX_STEPS:
            problems.append(((*c_at, "factor"), f"K = {cal.factor} gives the {n}-step student a teacher of {tn} "
                             f"steps, more than {MAX_STEPS}"))
            continue
        if cal.teacher_order is not None and cal.teacher_sampler == "gddim" and cal.teacher_order > tn - 1:
            problems.append(((*c_at, "teacher_order"), f"gDDIM order {cal.teacher_order} needs at least "
                             f"{cal.teacher_order + 1} teacher steps; at NFE {n} the teacher takes {tn}"))
    return problems


def _check_start_from(spec: Spec, m: int, earlier: dict[str, int]) -> list[Problem]:
    """A branch starts at a student an earlier method's chain produces (earlier: its stages come first)."""
    method = spec.methods[m]
    source = method.start_from
    if source == method.name:
        return [(("methods", m, "start_from"), "a chain cannot start from its own student")]
    if source not in earlier:
        later = any(other.name == source for other in spec.methods)
        where = "is listed after this one; list it first" if later else f"does not exist (methods: {sorted(earlier)})"
        return [(("methods", m, "start_from"), f"method {source!r} {where}")]
    if not isinstance(spec.methods[earlier[source]], ChainFields):
        return [(("methods", m, "start_from"), f"method {source!r} is not a distillation chain: it has no students")]
    produced = spec.methods[earlier[source]].student_steps()
    if method.start_steps not in produced:
        return [(("methods", m, "start_steps"),
                 f"method {source!r} produces no {method.start_steps}-step student to start from (its chain: {produced})")]
    return []


def _check_metrics(ev: EvaluationSpec) -> list[Problem]:
    """Extra metrics need an extractor that provides their features and enough samples for torch-fidelity."""
    problems: list[Problem] = []
    supported = keys.EXTRACTOR_METRICS.get(ev.feature_extractor, ())
    for k, metric in enumerate(ev.metrics):
        if metric not in supported:
            why = " (it has no class logits)" if metric == keys.METRIC_ISC else ""
            problems.append((("evaluation", "metrics", k),
                             f"feature extractor {ev.feature_extractor} cannot compute {metric}{why}; it supports: "
                             f"{', '.join(supported)}"))
    if keys.METRIC_ISC in ev.metrics and ev.num_samples < keys.ISC_SPLITS_DEFAULT:
        problems.append((("evaluation", "num_samples"),
                         f"the Inception Score is a mean over {keys.ISC_SPLITS_DEFAULT} splits: it needs at least "
                         f"{keys.ISC_SPLITS_DEFAULT} samples"))
    if keys.METRIC_PRC in ev.metrics and ev.num_samples <= keys.PRC_NEIGHBORHOOD_DEFAULT:
        # each sample's k-NN radius is the distance to its (k+1)-th nearest sample, itself being the first
        problems.append((("evaluation", "num_samples"),
                         f"precision/recall with k = {keys.PRC_NEIGHBORHOOD_DEFAULT} neighbours needs more than "
                         f"{keys.PRC_NEIGHBORHOOD_DEFAULT} samples"))
    return problems


# Stages one spec may compile to (the committed ones: 19 to 52). Each is a DVC stage, a Python start-up and an
# `import torch` on every `dvc repro` status check; thousands would make the pipeline unusable and compile slow.
MAX_STAGES = 400


def stage_count(spec: Spec) -> int:
    """The number of stages `build_graph` makes, counted without building them (an upper bound: chains that two
    methods share are counted twice)."""
    ev = spec.evaluation
    per_seed = 0
    for method in spec.methods:
        if not isinstance(method, ChainFields):  # a sampler of the teacher: its FID stages and at most one more each
            per_seed += 2 * len(method.nfes(ev))
            continue
        per_seed += len(method.student_steps()) + len(ev.student_steps)  # halvings, FID stages
        if isinstance(method, SferdPDMethod) and method.predictor is not None:
            per_seed += 2 * len(ev.student_steps)  # predictor and prior per evaluated student
    fixed = 4 + len(ev.teacher_steps) + len(ev.calibration)  # data, features, teacher, reference stats, render
    fixed += sum(isinstance(method, CfdMethod) for method in spec.methods)  # a classifier stage each (at most)
    return fixed + len(spec.chain_seeds) * per_seed


def _check_size(spec: Spec) -> list[Problem]:
    n = stage_count(spec)
    if n <= MAX_STAGES:
        return []
    where = ("seeds",) if spec.seeds is not None else ("methods",)
    return [(where, f"the spec expands to about {n} stages (methods × halvings × evaluated steps × seeds); at most "
                    f"{MAX_STAGES}: split it into several specs")]


def _check_paired(spec: Spec, names: dict[str, int]) -> list[Problem]:
    """`table.paired_against` names a method of this spec, and there are seeds to pair: a Student-t interval over
    per-seed differences needs n ≥ 2 (its n − 1 degrees of freedom)."""
    baseline = spec.table.paired_against
    if baseline is None:
        return []
    where = ("table", "paired_against")
    if baseline not in names:
        return [(where, f"no method named {baseline!r} to pair against (methods: {sorted(names)})")]
    n = len(spec.chain_seeds)
    if n < 2:
        how = f"`seeds` lists {n}" if spec.seeds is not None else "the spec has one (`seed`; no `seeds` list)"
        return [(where, f"paired differences need at least 2 seeds for an interval (n − 1 degrees of freedom); "
                        f"{how}")]
    return []


# metrics-file value → the `evaluation.metrics` option that produces it
PRODUCER = {value: option for option, values in keys.METRIC_VALUES.items() for value in values}


def check_spec(spec: Spec) -> list[Problem]:
    problems: list[Problem] = []
    res = spec.dataset.resolution
    model = spec.teacher.model

    problems.extend(unet_problems(model, res, ("teacher", "model")))
    digits = spec.dataset.id.startswith("digits-")
    if digits and spec.dataset.source is not None:
        problems.append((("dataset", "source"), "digits are embedded in scikit-learn: remove `source`"))
    if not digits and spec.dataset.source is None:
        problems.append((("dataset", "id"), f"{spec.dataset.id} needs `dataset.source.data_dir` (where its files are)"))
    if spec.dataset.source is not None and spec.dataset.id == "imagenet-64x64" and spec.dataset.source.download:
        problems.append((("dataset", "source", "download"), "ImageNet 64×64 cannot be downloaded automatically; "
                         "fetch the npz files by hand and set data_dir"))
    if model.class_conditional and spec.dataset.num_classes < 2:
        problems.append((("teacher", "model", "class_conditional"), f"{spec.dataset.id} has no class labels"))

    ev = spec.evaluation
    if ev.feature_extractor == "digits-cnn":
        # on other data (a paper spec at smoke scale) the same small CNN is trained on that data's own classes
        if spec.features is None:
            problems.append((("evaluation", "feature_extractor"), "digits-cnn needs a `features` block (its training stage)"))
        if spec.dataset.num_classes != 10:
            problems.append((("evaluation", "feature_extractor"),
                             f"digits-cnn is a 10-class classifier; {spec.dataset.id} has {spec.dataset.num_classes} classes"))
    elif spec.features is not None:
        problems.append((("features",), f"unused: feature_extractor is {ev.feature_extractor}"))
    if ev.feature_weights is not None and ev.feature_extractor != "inception-v3-compat":
        problems.append((("evaluation", "feature_weights"), "only for inception-v3-compat (digits-cnn weights come from its stage)"))
    if ev.feature_extractor == "inception-v3-compat" and spec.dataset.id.startswith("digits-"):
        problems.append((("evaluation", "feature_extractor"), "Inception features are meaningless on 1-channel digits; use digits-cnn"))

    names: dict[str, int] = {}
    cld_teachers: dict[str, int] = {}  # CLD teacher name → the first method that defines it
    for m, method in enumerate(spec.methods):
        if method.name in names:
            problems.append((("methods", m, "name"), f"method name {method.name!r} already used by methods.{names[method.name]}"))
        names[method.name] = m
        for scale in spec.scales:
            if method.name.startswith(f"{scale}-"):
                problems.append((("methods", m, "name"), f"starts with the scale profile's name {scale!r}: the stages of "
                                 f"`--scale {scale}` would collide with this method's"))
        if isinstance(method, SferdPDMethod):
            problems.extend(_check_sferd(spec, m, method))
        if isinstance(method, CfdMethod):
            problems.extend(_check_cfd(spec, m, method))
        if isinstance(method, SolverMethod):
            problems.extend(_check_solver(spec, m, method))
        if isinstance(method, CLDMethod):
            problems.extend(_check_cld(spec, m, method, cld_teachers))
        if not isinstance(method, ChainFields):
            continue  # not a distillation chain: no students to check
        if method.start_from is not None:
            problems.extend(_check_start_from(spec, m, names))
        chain = set(method.student_steps())
        for k, steps in enumerate(ev.student_steps):
            if steps not in chain:
                problems.append(
                    (("evaluation", "student_steps", k),
                     f"method {method.name!r} produces no {steps}-step student (its chain: {sorted(chain, reverse=True)})")
                )

    problems.extend(_check_metrics(ev))
    if not problems:
        problems.extend(_check_size(spec))

    problems.extend(_check_paired(spec, names))

    for r, row in enumerate(spec.reported):
        if row.method is not None and row.method not in names:
            problems.append((("reported", r, "method"), f"no method named {row.method!r} (methods: {sorted(names)})"))
        if PRODUCER[row.metric] not in ev.metrics:
            # a paper number with nothing of ours beside it would be a table row that can never be compared
            problems.append((("reported", r, "metric"), f"{row.metric} is not computed by this spec: add "
                             f"{PRODUCER[row.metric]} to evaluation.metrics"))
    return problems
