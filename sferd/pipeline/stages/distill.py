"""Stage `distill`: one progressive-distillation halving (sferd-method.md §5; Salimans & Ho 2022), with the
plain teacher (PD) or the attention-guided one (SFERD-PD, §6), or a CFD halving (params carry a `cfd` block: the
PD target, the frozen classifier's loss in place of the pixel MSE; sferd/methods/cfd.py).

The student starts as a copy of its teacher (the teacher's EMA weights in the first halving, the previous
student afterwards), with dropout 0 and a fresh Adam whose learning rate decays linearly to 0.
"""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import (checkpoint_payload, load_model, open_training_split, stage_stream,
                                          training_log_path)
from sferd.util.artifacts import fresh_dir, torch_save, write_json
from sferd.util.errors import StageError


def run(name: str, params: dict) -> None:
    import torch

    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.methods.cfd import GroupError, cfd_loss
    from sferd.methods.guidance import teacher_denoiser
    from sferd.methods.pd import pd_loss
    from sferd.methods.training import ImageSource, Session, linear_to_zero
    from sferd.nn.build import build_unet

    tr = params["training"]
    steps = params["student_steps"]
    with Session(name, params) as s:
        split = open_training_split(params["inputs"]["train"])
        teacher_net = load_model(params["teacher"]["checkpoint"], params["teacher"]["model"]).to(s.device)
        student_net = build_unet(params["model"]).to(s.device)
        student_net.load_state_dict(teacher_net.state_dict())
        teacher = teacher_denoiser(teacher_net, params["parameterization"], params["guidance"])
        student = NetworkDenoiser(student_net, params["parameterization"])
        cfd = params.get("cfd")
        classifier = None
        if cfd is not None:  # frozen, outside the loss module: DDP synchronises only what trains
            from sferd.nn.classifiers import load_classifier

            try:
                classifier = load_classifier(cfd["classifier"]["checkpoint"],
                                             expect=cfd["classifier"]["network"]).to(s.device)
            except ValueError as e:
                raise StageError(f"{e}; recompile the spec and re-run its classifier stage") from None
            group = cfd["coverage_group_size"] or tr["batch_size"]

        class Loss(torch.nn.Module):
            """Only the student is a submodule: DDP synchronises what trains; the frozen teacher stays outside."""

            def __init__(self):
                super().__init__()
                self.student = student_net

            def forward(self, batch):
                if classifier is not None:
                    try:
                        return cfd_loss(student, teacher, batch.x0, steps, batch.draws, classifier=classifier,
                                        temperature=cfd["temperature"], beta=cfd["beta"], gamma=cfd["gamma"],
                                        coverage_group_size=group, y=batch.y)
                    except GroupError as e:
                        raise StageError(str(e)) from None
                return pd_loss(student, teacher, batch.x0, steps, batch.draws, weighting=params["loss_weighting"],
                               y=batch.y)

        summary = s.train(
            module=Loss(), trainable=student_net, optimizer=s.adam(student_net.parameters(), lr=tr["lr"]),
            source=ImageSource(split, seed=params["seed"], flip=params["dataset"]["random_flip"],
                               conditional=bool(params["model"].get("num_classes"))),
            batch_size=tr["batch_size"], updates=tr["updates"], lr_lambda=linear_to_zero(tr["updates"]),
            grad_clip_norm=tr["grad_clip_norm"], checkpoint_every=tr["checkpoint_every_updates"],
            seed=params["seed"], stream=stage_stream(name), log_path=training_log_path(params),
        )
        if s.is_writer:
            out = fresh_dir(params["outputs"]["dir"])
            torch_save(out / "model.pt", checkpoint_payload(student_net, params, weights="student"))
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, "student_steps": steps, **summary})
