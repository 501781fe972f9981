"""Stage `prior`: SFERD stage (c) — the latent prior over normalised semantic codes (sferd-method.md §8).

The training set is encoded with the encoder's EMA weights (no flips), batched on the device, each process
encoding the whole split in the same batches (the codes, and so their statistics, are then identical on every
rank); per-dimension mean/std are fitted and stored with the prior, and an MLP diffusion model (constant
β = 0.008, 1000 steps, ε-prediction, L1) learns the normalised codes.
"""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import open_training_split, stage_stream, training_log_path
from sferd.util.artifacts import fresh_dir, torch_load, torch_save, write_json
from sferd.util.errors import StageError

ENCODE_BATCH = 256  # fixed: codes must not depend on a machine-local setting


def encode_split(encoder, split, device) -> "torch.Tensor":
    """Codes of every training image, in order, encoded on `device` in batches of ENCODE_BATCH (uint8 → float on
    the device; the split is never materialised as float)."""
    import numpy as np
    import torch

    from sferd.data.arrays import to_model_range

    codes = []
    with torch.no_grad():
        for i in range(0, len(split), ENCODE_BATCH):
            x = to_model_range(split.gather(np.arange(i, min(i + ENCODE_BATCH, len(split)))), device)
            codes.append(encoder(x).float())
    return torch.cat(codes)


def run(name: str, params: dict) -> None:
    import numpy as np
    import torch

    import sferd
    from sferd.methods.latent_prior import LatentDiffusion, LatentStats
    from sferd.methods.training import EMA, Session, TensorSource, warmup_constant
    from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig
    from sferd.pipeline.stages.predictor import build_encoder

    pp = params["prior"]
    with Session(name, params) as s:
        ckpt = torch_load(params["predictor"]["checkpoint"])
        if ckpt["config"]["encoder"] != params["predictor"]["encoder"]:
            raise StageError(f"{params['predictor']['checkpoint']} holds another encoder; re-run its predictor stage")
        encoder = build_encoder(params["predictor"]["encoder"])
        encoder.load_state_dict(ckpt["encoder"])
        encoder.to(s.device).eval().requires_grad_(False)

        split = open_training_split(params["inputs"]["train"])
        codes = encode_split(encoder, split, s.device).cpu()
        stats = LatentStats.fit(codes)
        z_n = stats.normalize(codes)
        num_classes = params["num_classes"]
        labels = torch.from_numpy(np.asarray(split.labels)).long() if num_classes else None

        mlp = LatentMLP(LatentMLPConfig(latent_dim=codes.shape[1], width=pp["width"], num_layers=pp["num_layers"],
                                        time_emb_dim=pp["time_emb_dim"], num_classes=num_classes)).to(s.device)
        diffusion = LatentDiffusion()
        ema = EMA(mlp, pp["ema_decay"])
        opt = s.adam(mlp.parameters(), lr=pp["lr"], weight_decay=pp["weight_decay"])

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = mlp

            def forward(self, batch):
                return diffusion.loss(mlp, batch.x0, draws=batch.draws, y=batch.y)

        summary = s.train(
            module=Loss(), trainable=mlp, optimizer=opt, ema=ema, source=TensorSource(z_n, labels, seed=params["seed"]),
            batch_size=pp["batch_size"], updates=pp["updates"], lr_lambda=warmup_constant(0), grad_clip_norm=1.0,
            checkpoint_every=max(1, pp["updates"] // 4), seed=params["seed"], stream=stage_stream(name),
            log_path=training_log_path(params),
        )
        if s.is_writer:
            out = fresh_dir(params["outputs"]["dir"])
            torch_save(out / "prior.pt", {
                "mlp": {k: v.detach().to("cpu", copy=True) for k, v in ema.model.state_dict().items()},
                "mlp_config": {"latent_dim": int(codes.shape[1]), "width": pp["width"], "num_layers": pp["num_layers"],
                               "time_emb_dim": pp["time_emb_dim"], "num_classes": num_classes},
                "stats": stats.state_dict(),
                "config": params,
                "sferd_version": sferd.__version__,
            })
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, **summary,
                                                      "code_std_mean": float(stats.std.mean()),
                                                      "num_codes": int(len(codes))})
