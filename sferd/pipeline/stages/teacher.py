"""Stage `teacher`: train the diffusion teacher (sferd-method.md §4) and save its EMA weights."""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import read_npz, torch_save, write_json
from sferd.pipeline.stages.common import checkpoint_payload, training_labels


def run(name: str, params: dict) -> None:
    import torch

    from sferd.data.arrays import BatchSampler, to_model_range
    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.methods.teacher import teacher_loss
    from sferd.methods.training import EMA, seed_everything, train_loop, warmup_constant
    from sferd.nn.build import build_unet

    tr = params["training"]
    out = Path(params["outputs"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.pt").unlink(missing_ok=True)  # final weights exist only once training has finished

    seed_everything(params["seed"])
    data = read_npz(params["inputs"]["train"])
    x = to_model_range(data["images"])
    labels = training_labels(params["model"], data)
    net = build_unet(params["model"])
    ema = EMA(net, tr["ema_decay"])
    opt = torch.optim.AdamW(net.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"])
    sampler = BatchSampler(x, labels, tr["batch_size"], seed=params["seed"] + 1, flip=params["dataset"]["random_flip"])
    noise_gen = torch.Generator().manual_seed(params["seed"] + 2)
    denoiser = NetworkDenoiser(net, tr["parameterization"])

    def loss_fn(step: int):
        x0, y = sampler.next()
        return teacher_loss(denoiser, x0, noise_gen, weighting=tr["loss_weighting"], y=y)

    summary = train_loop(
        label=name, model=net, optimizer=opt, lr_lambda=warmup_constant(tr["warmup_updates"]), loss_fn=loss_fn,
        updates=tr["updates"], grad_clip_norm=tr["grad_clip_norm"], state_path=out / "state.pt",
        config=params, checkpoint_every=tr["checkpoint_every_updates"],
        rng_objects={"data": sampler.generator, "noise": noise_gen}, ema=ema,
    )
    torch_save(out / "model.pt", checkpoint_payload(ema.model, params, weights="ema"))
    write_json(out / "config.json", params)
    write_json(params["outputs"]["metrics"], {"stage": name, **summary, "parameters": sum(p.numel() for p in net.parameters())})
