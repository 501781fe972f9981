"""Stage `distill`: one progressive-distillation halving (sferd-method.md §5; Salimans & Ho 2022), with the
plain teacher (PD) or the attention-guided one (SFERD-PD, §6). A CFD halving (stage `distill_cfd`) runs this same
halving with its own loss in place of the pixel MSE (`batch_loss`).

The student starts as a copy of its teacher (the teacher's EMA weights in the first halving, the previous
student afterwards), with dropout 0 and a fresh Adam whose learning rate decays linearly to 0.
"""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import (checkpoint_payload, load_model, open_training_split, stage_stream,
                                          training_log_path)
from sferd.util.artifacts import fresh_dir, torch_save, write_json
from sferd.util.errors import StageError


def run(name: str, params: dict, *, batch_loss=None) -> None:
    """`batch_loss(params, student, teacher, device) -> loss(batch)`, when given, replaces PD's pixel loss (its
    per-sample losses, as `pd_loss` returns them; CFD: sferd/pipeline/stages/distill_cfd.py)."""
    import torch

    from sferd.diffusion.denoiser import NetworkDenoiser
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
        if (params.get("cfd") is not None) != (batch_loss is not None):
            raise StageError(f"stage {name!r}: a CFD halving runs as kind distill_cfd; recompile with `sferd-spec compile`")
        custom = batch_loss(params, student, teacher, s.device) if batch_loss is not None else None

        class Loss(torch.nn.Module):
            """Only the student is a submodule: DDP synchronises what trains; the frozen teacher stays outside."""

            def __init__(self):
                super().__init__()
                self.student = student_net

            def forward(self, batch):
                if custom is not None:
                    return custom(batch)
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
