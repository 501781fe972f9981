"""Stage `distill`: one progressive-distillation halving (sferd-method.md §5; Salimans & Ho 2022), with the
plain teacher (PD) or the attention-guided one (SFERD-PD, §6).

The student starts as a copy of its teacher (the teacher's EMA weights in the first halving, the previous
student afterwards), with dropout 0 and a fresh Adam whose learning rate decays linearly to 0.
"""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import read_npz, torch_save, write_json
from sferd.pipeline.stages.common import checkpoint_payload, load_model, training_labels


def run(name: str, params: dict) -> None:
    import torch

    from sferd.data.arrays import BatchSampler, to_model_range
    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.methods.pd import pd_loss
    from sferd.methods.guidance import teacher_denoiser
    from sferd.methods.training import linear_to_zero, seed_everything, train_loop
    from sferd.nn.build import build_unet

    tr = params["training"]
    out = Path(params["outputs"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.pt").unlink(missing_ok=True)

    seed_everything(params["seed"])
    data = read_npz(params["inputs"]["train"])
    x = to_model_range(data["images"])
    labels = training_labels(params["model"], data)

    teacher_net = load_model(params["teacher"]["checkpoint"], params["teacher"]["model"])
    student_net = build_unet(params["model"])
    student_net.load_state_dict(teacher_net.state_dict())
    teacher = teacher_denoiser(teacher_net, params["parameterization"], params["guidance"])
    student = NetworkDenoiser(student_net, params["parameterization"])

    steps = params["student_steps"]
    opt = torch.optim.Adam(student_net.parameters(), lr=tr["lr"])
    sampler = BatchSampler(x, labels, tr["batch_size"], seed=params["seed"] + 10 * steps + 1, flip=params["dataset"]["random_flip"])
    point_gen = torch.Generator().manual_seed(params["seed"] + 10 * steps + 2)

    def loss_fn(step: int):
        x0, y = sampler.next()
        return pd_loss(student, teacher, x0, steps, point_gen, weighting=params["loss_weighting"], y=y)

    summary = train_loop(
        label=name, model=student_net, optimizer=opt, lr_lambda=linear_to_zero(tr["updates"]), loss_fn=loss_fn,
        updates=tr["updates"], grad_clip_norm=tr["grad_clip_norm"], state_path=out / "state.pt",
        config=params, checkpoint_every=tr["checkpoint_every_updates"],
        rng_objects={"data": sampler.generator, "points": point_gen},
    )
    torch_save(out / "model.pt", checkpoint_payload(student_net, params, weights="student"))
    write_json(out / "config.json", params)
    write_json(params["outputs"]["metrics"], {"stage": name, "student_steps": steps, **summary})
