"""Semantic checks that need several fields at once (DESIGN.md "How a spec becomes results", step 1).

Pydantic field validators catch local mistakes; the rules here relate parts of the spec (an evaluated step
count must be produced by each chain, attention must sit at a resolution the U-Net has, …). Each rule
returns the location of the offending value so the CLI prints file:line:col like any other error.
"""

from __future__ import annotations

from sferd.spec.models import Spec

Problem = tuple[tuple[str | int, ...], str]


def check_spec(spec: Spec) -> list[Problem]:
    problems: list[Problem] = []
    res = spec.dataset.resolution
    model = spec.teacher.model

    levels = model.resolutions(res)
    if res % 2 ** (len(model.channel_mult) - 1):
        problems.append(
            (("teacher", "model", "channel_mult"),
             f"{len(model.channel_mult)} levels need the resolution ({res}) divisible by {2 ** (len(model.channel_mult) - 1)}")
        )
    for k, r in enumerate(model.attention_resolutions):
        if r not in levels:
            problems.append(
                (("teacher", "model", "attention_resolutions", k),
                 f"the U-Net has no {r}×{r} level at {res}×{res} input (levels: {levels})")
            )
    if model.class_conditional and spec.dataset.num_classes < 2:
        problems.append((("teacher", "model", "class_conditional"), f"{spec.dataset.id} has no class labels"))

    ev = spec.evaluation
    if ev.feature_extractor == "digits-cnn":
        if not spec.dataset.id.startswith("digits-"):
            problems.append((("evaluation", "feature_extractor"), "digits-cnn features only exist for digits datasets"))
        if spec.features is None:
            problems.append((("evaluation", "feature_extractor"), "digits-cnn needs a `features` block (its training stage)"))
    elif spec.features is not None:
        problems.append((("features",), f"unused: feature_extractor is {ev.feature_extractor}"))
    if ev.feature_extractor == "inception-v3-compat" and spec.dataset.id.startswith("digits-"):
        problems.append((("evaluation", "feature_extractor"), "Inception features are meaningless on 1-channel digits; use digits-cnn"))

    names: dict[str, int] = {}
    for m, method in enumerate(spec.methods):
        if method.name in names:
            problems.append((("methods", m, "name"), f"method name {method.name!r} already used by methods.{names[method.name]}"))
        names[method.name] = m
        chain = set(method.student_steps())
        for k, steps in enumerate(ev.student_steps):
            if steps not in chain:
                problems.append(
                    (("evaluation", "student_steps", k),
                     f"method {method.name!r} produces no {steps}-step student (its chain: {sorted(chain, reverse=True)})")
                )

    for r, row in enumerate(spec.reported):
        if row.method is not None and row.method not in names:
            problems.append((("reported", r, "method"), f"no method named {row.method!r} (methods: {sorted(names)})"))
    return problems
