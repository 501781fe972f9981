"""Stage `distill_cfd`: a CFD halving (Sun et al., ICME 2023; sferd/methods/cfd.py): the `distill` stage's halving
with the frozen classifier's feature loss on the PD target in place of the pixel MSE.

A kind of its own so that the code of plain PD and SFERD halvings does not include the CFD loss and the classifier
networks: code deps follow each kind's imports, and an edit here must not re-run every halving of every chain.
"""

from __future__ import annotations

from sferd.pipeline.stages import distill
from sferd.util.errors import StageError


def _cfd_batch_loss(params: dict, student, teacher, device):
    from sferd.methods.cfd import GroupError, cfd_loss
    from sferd.nn.classifiers import load_classifier

    cfd = params["cfd"]
    try:  # frozen, outside the loss module: DDP synchronises only what trains
        classifier = load_classifier(cfd["classifier"]["checkpoint"], expect=cfd["classifier"]["network"]).to(device)
    except ValueError as e:
        raise StageError(f"{e}; recompile the spec and re-run its classifier stage") from None
    group = cfd["coverage_group_size"] or params["training"]["batch_size"]
    steps = params["student_steps"]

    def loss(batch):
        try:
            return cfd_loss(student, teacher, batch.x0, steps, batch.draws, classifier=classifier,
                            temperature=cfd["temperature"], beta=cfd["beta"], gamma=cfd["gamma"],
                            coverage_group_size=group, y=batch.y)
        except GroupError as e:
            raise StageError(str(e)) from None

    return loss


def run(name: str, params: dict) -> None:
    if params.get("cfd") is None:
        raise StageError(f"stage {name!r} is a distill_cfd stage without a `cfd` block; recompile with `sferd-spec compile`")
    distill.run(name, params, batch_loss=_cfd_batch_loss)
