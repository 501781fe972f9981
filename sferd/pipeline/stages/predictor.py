"""Stage `predictor`: SFERD stage (b) — train the semantic encoder and gradient predictor on a frozen student
(sferd-method.md §7, §9; D5). Writes the EMA weights of both to `predictor.pt`."""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import load_model, open_training_split, stage_stream, training_log_path
from sferd.util.artifacts import fresh_dir, torch_save, write_json


def build_encoder(enc: dict):
    from sferd.nn.predictor import EncoderConfig, SemanticEncoder

    return SemanticEncoder(
        EncoderConfig(
            in_channels=enc["in_channels"], resolution=enc["resolution"], channels=tuple(enc["channels"]),
            attention_after=enc["attention_after"], latent_dim=enc["latent_dim"],
        )
    )


def run(name: str, params: dict) -> None:
    import torch

    import sferd
    from sferd.methods.guidance import teacher_denoiser
    from sferd.methods.sferd import check_shift_parameterization, predictor_loss
    from sferd.methods.training import EMA, ImageSource, Session, warmup_constant
    from sferd.nn.predictor import GradientPredictor

    pr = params["predictor"]
    steps = params["student_steps"]
    # D15: how G enters the shift (c_t·G); recorded in predictor.pt so sampling uses the form training used.
    shift_form = pr["shift_parameterization"]
    check_shift_parameterization(shift_form)
    with Session(name, params) as s:
        split = open_training_split(params["inputs"]["train"])
        student_net = load_model(params["student"]["checkpoint"], params["student"]["model"]).to(s.device)
        teacher_net = load_model(params["teacher"]["checkpoint"], params["teacher"]["model"]).to(s.device)
        teacher = teacher_denoiser(teacher_net, params["parameterization"], params["guidance"])

        encoder = build_encoder(params["encoder"]).to(s.device)
        predictor = GradientPredictor(student_net, latent_dim=params["encoder"]["latent_dim"],
                                      init_from_student=pr["init_from_student"])
        trainable = torch.nn.ModuleDict({"encoder": encoder, "predictor": predictor})
        ema = EMA(trainable, pr["ema_decay"])
        opt = s.adam(list(encoder.parameters()) + list(predictor.trainable_parameters()), lr=pr["lr"])

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.trainable = trainable  # the frozen student inside the predictor has requires_grad off

            def forward(self, batch):
                return predictor_loss(encoder=encoder, predictor=predictor, teacher=teacher,
                                      parameterization=params["parameterization"], x0=batch.x0, num_steps=steps,
                                      draws=batch.draws, weighting=params["loss_weighting"],
                                      shift_parameterization=shift_form, y=batch.y)

        summary = s.train(
            module=Loss(), trainable=trainable, optimizer=opt, ema=ema,
            source=ImageSource(split, seed=params["seed"], flip=params["dataset"]["random_flip"],
                               conditional=bool(params["student"]["model"].get("num_classes"))),
            batch_size=pr["batch_size"], updates=pr["updates"], lr_lambda=warmup_constant(0),
            grad_clip_norm=pr["grad_clip_norm"], checkpoint_every=max(1, pr["updates"] // 4),
            seed=params["seed"], stream=stage_stream(name), log_path=training_log_path(params),
        )
        if s.is_writer:
            final = ema.model
            out = fresh_dir(params["outputs"]["dir"])
            torch_save(out / "predictor.pt", {
                "encoder": {k: v.detach().to("cpu", copy=True) for k, v in final["encoder"].state_dict().items()},
                "predictor": {k: v.detach().to("cpu", copy=True) for k, v in final["predictor"].state_dict_own().items()},
                "config": params,
                "shift_parameterization": shift_form,
                "sferd_version": sferd.__version__,
            })
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, "student_steps": steps, **summary})
