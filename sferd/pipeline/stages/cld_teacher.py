"""Stage `cld_teacher`: train a CLD score model (sferd/methods/cld_teacher.py for the loss and why) and save its EMA
weights. The suite's training engine runs it (`Session`): DDP under torchrun, resumable, and every sample's image,
time and noise drawn from its own generator, so the weights do not depend on batch split or process count."""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import (checkpoint_payload, open_training_split, stage_stream,
                                          training_log_path)
from sferd.util.artifacts import fresh_dir, torch_save, write_json


def run(name: str, params: dict) -> None:
    import torch

    from sferd.methods.cld_teacher import cld_process, cld_teacher_loss
    from sferd.methods.training import EMA, ImageSource, Session, warmup_constant
    from sferd.nn.build import build_unet

    tr = params["training"]
    process = cld_process(params["process"])  # R_t is integrated once here (~0.2 s), before any update
    with Session(name, params) as s:
        split = open_training_split(params["inputs"]["train"])
        net = build_unet(params["model"]).to(s.device)
        ema = EMA(net, tr["ema_decay"])
        opt = s.adam(net.parameters(), lr=tr["lr"])

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, batch):
                return cld_teacher_loss(net, process, batch.x0, batch.draws, y=batch.y, mixed=params["mixed_score"])

        summary = s.train(
            module=Loss(), trainable=net, optimizer=opt, ema=ema,
            source=ImageSource(split, seed=params["seed"], flip=params["dataset"]["random_flip"],
                               conditional=bool(params["model"].get("num_classes"))),
            batch_size=tr["batch_size"], updates=tr["updates"], lr_lambda=warmup_constant(tr["warmup_updates"]),
            grad_clip_norm=tr["grad_clip_norm"], checkpoint_every=tr["checkpoint_every_updates"],
            seed=params["seed"], stream=stage_stream(name), log_path=training_log_path(params),
        )
        if s.is_writer:
            out = fresh_dir(params["outputs"]["dir"])
            torch_save(out / "model.pt", checkpoint_payload(ema.model, params, weights="ema"))
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, **summary,
                                                      "parameters": sum(p.numel() for p in net.parameters())})
