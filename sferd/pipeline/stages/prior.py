"""Stage `prior`: SFERD stage (c) — the latent prior over normalised semantic codes (sferd-method.md §8).

The training set is encoded with the encoder's EMA weights (no flips), per-dimension mean/std are fitted and
stored with the prior, and an MLP diffusion model (constant β = 0.008, 1000 steps, ε-prediction, L1) learns the
normalised codes.
"""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import read_npz, torch_load, torch_save, write_json
from sferd.util.errors import StageError


def run(name: str, params: dict) -> None:
    import torch

    import sferd
    from sferd.data.arrays import to_model_range
    from sferd.methods.latent_prior import LatentDiffusion, LatentStats
    from sferd.methods.training import EMA, seed_everything, train_loop, warmup_constant
    from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig
    from sferd.pipeline.stages.predictor import build_encoder

    pp = params["prior"]
    out = Path(params["outputs"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "prior.pt").unlink(missing_ok=True)
    seed_everything(params["seed"])

    ckpt = torch_load(params["predictor"]["checkpoint"])
    if ckpt["config"]["encoder"] != params["predictor"]["encoder"]:
        raise StageError(f"{params['predictor']['checkpoint']} holds another encoder; re-run its predictor stage")
    encoder = build_encoder(params["predictor"]["encoder"])
    encoder.load_state_dict(ckpt["encoder"])
    encoder.eval().requires_grad_(False)

    data = read_npz(params["inputs"]["train"])
    x = to_model_range(data["images"])
    with torch.no_grad():
        codes = torch.cat([encoder(x[i:i + 256]) for i in range(0, len(x), 256)])
    stats = LatentStats.fit(codes)
    z_n = stats.normalize(codes)
    num_classes = params["num_classes"]
    labels = torch.from_numpy(data["labels"]).long() if num_classes else None

    mlp = LatentMLP(LatentMLPConfig(latent_dim=codes.shape[1], width=pp["width"], num_layers=pp["num_layers"],
                                    time_emb_dim=pp["time_emb_dim"], num_classes=num_classes))
    diffusion = LatentDiffusion()
    ema = EMA(mlp, pp["ema_decay"])
    opt = torch.optim.AdamW(mlp.parameters(), lr=pp["lr"], weight_decay=pp["weight_decay"])
    gen = torch.Generator().manual_seed(params["seed"] + 7)

    def loss_fn(step: int):
        idx = torch.randint(0, len(z_n), (pp["batch_size"],), generator=gen)
        return diffusion.loss(mlp, z_n[idx], generator=gen, y=labels[idx] if labels is not None else None)

    summary = train_loop(
        label=name, model=mlp, optimizer=opt, lr_lambda=warmup_constant(0), loss_fn=loss_fn, updates=pp["updates"],
        grad_clip_norm=1.0, state_path=out / "state.pt", config=params, checkpoint_every=max(1, pp["updates"] // 4),
        rng_objects={"batches": gen}, ema=ema,
    )
    torch_save(out / "prior.pt", {
        "mlp": {k: v.clone() for k, v in ema.model.state_dict().items()},
        "mlp_config": {"latent_dim": int(codes.shape[1]), "width": pp["width"], "num_layers": pp["num_layers"],
                       "time_emb_dim": pp["time_emb_dim"], "num_classes": num_classes},
        "stats": stats.state_dict(),
        "config": params,
        "sferd_version": sferd.__version__,
    })
    write_json(out / "config.json", params)
    write_json(params["outputs"]["metrics"], {"stage": name, **summary,
                                              "code_std_mean": float(stats.std.mean()), "num_codes": int(len(codes))})
