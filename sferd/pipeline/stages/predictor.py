"""Stage `predictor`: SFERD stage (b) — train the semantic encoder and gradient predictor on a frozen student
(sferd-method.md §7, §9; D5). Writes the EMA weights of both to `predictor.pt`."""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import read_npz, torch_save, write_json
from sferd.pipeline.stages.common import load_model, training_labels


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
    from sferd.data.arrays import BatchSampler, to_model_range
    from sferd.methods.sferd import predictor_loss
    from sferd.methods.guidance import teacher_denoiser
    from sferd.methods.training import EMA, seed_everything, train_loop, warmup_constant
    from sferd.nn.predictor import GradientPredictor

    pr = params["predictor"]
    out = Path(params["outputs"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor.pt").unlink(missing_ok=True)

    seed_everything(params["seed"])
    data = read_npz(params["inputs"]["train"])
    x = to_model_range(data["images"])
    labels = training_labels(params["student"]["model"], data)

    student_net = load_model(params["student"]["checkpoint"], params["student"]["model"])
    teacher_net = load_model(params["teacher"]["checkpoint"], params["teacher"]["model"])
    teacher = teacher_denoiser(teacher_net, params["parameterization"], params["guidance"])

    encoder = build_encoder(params["encoder"])
    predictor = GradientPredictor(student_net, latent_dim=params["encoder"]["latent_dim"],
                                  init_from_student=pr["init_from_student"])
    trainable = torch.nn.ModuleDict({"encoder": encoder, "predictor": predictor})
    ema = EMA(trainable, pr["ema_decay"])
    opt = torch.optim.Adam(list(encoder.parameters()) + list(predictor.trainable_parameters()), lr=pr["lr"])
    steps = params["student_steps"]
    sampler = BatchSampler(x, labels, pr["batch_size"], seed=params["seed"] + 100 * steps + 1,
                           flip=params["dataset"]["random_flip"])
    point_gen = torch.Generator().manual_seed(params["seed"] + 100 * steps + 2)

    def loss_fn(step: int):
        x0, y = sampler.next()
        return predictor_loss(encoder=encoder, predictor=predictor, teacher=teacher,
                              parameterization=params["parameterization"], x0=x0, num_steps=steps,
                              generator=point_gen, weighting=params["loss_weighting"], y=y)

    summary = train_loop(
        label=name, model=trainable, optimizer=opt, lr_lambda=warmup_constant(0), loss_fn=loss_fn,
        updates=pr["updates"], grad_clip_norm=pr["grad_clip_norm"], state_path=out / "state.pt", config=params,
        checkpoint_every=max(1, pr["updates"] // 4), rng_objects={"data": sampler.generator, "points": point_gen},
        ema=ema,
    )
    final = ema.model
    torch_save(out / "predictor.pt", {
        "encoder": {k: v.clone() for k, v in final["encoder"].state_dict().items()},
        "predictor": final["predictor"].state_dict_own(),
        "config": params,
        "sferd_version": sferd.__version__,
    })
    write_json(out / "config.json", params)
    write_json(params["outputs"]["metrics"], {"stage": name, "student_steps": steps, **summary})
