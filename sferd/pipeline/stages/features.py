"""Stage `features`: train the quickstart's FID feature network (a digits classifier; the same small CNN on the
spec's own images when a paper spec runs at smoke scale).

Inception weights cannot be downloaded offline and mean little on 8×8 grey digits, so the quickstart's FID
uses the pooled features of a small CNN trained here on the training split and registered with
torch-fidelity. Its held-out accuracy is recorded: features of a classifier that cannot tell digits apart
would make every FID meaningless. Trained by the same engine as every other training stage (data parallel,
per-sample draws, resumable).
"""

from __future__ import annotations

from pathlib import Path

from sferd.pipeline.stages.common import open_training_split, stage_stream, training_log_path
from sferd.util.artifacts import fresh_dir, write_json

EVAL_BATCH = 512


def _accuracy(net, split, device) -> float:
    """Classification accuracy over a whole split, read in batches (never materialised as float)."""
    import numpy as np
    import torch

    from sferd.data.arrays import to_model_range

    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), EVAL_BATCH):
            rows = np.arange(i, min(i + EVAL_BATCH, len(split)))
            x = to_model_range(split.gather(rows), device)
            y = torch.from_numpy(np.asarray(split.labels[rows])).long().to(device)
            correct += int((net(x).argmax(1) == y).sum())
    return correct / len(split)


def run(name: str, params: dict) -> None:
    import torch
    import torch.nn.functional as F

    from sferd.methods.training import ImageSource, Session, warmup_constant
    from sferd.nn.digits_cnn import DigitsCNN, save_digits_cnn

    net_cfg = params["network"]
    with Session(name, params) as s:
        split = open_training_split(params["inputs"]["train"])
        channels, resolution = split.channels, split.resolution
        net = DigitsCNN(resolution, feature_dim=net_cfg["feature_dim"], width=net_cfg["width"],
                        channels=channels).to(s.device)

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, batch):
                return F.cross_entropy(net(batch.x0), batch.y, reduction="none")

        summary = s.train(
            module=Loss(), trainable=net, optimizer=s.adam(net.parameters(), lr=net_cfg["lr"]),
            source=ImageSource(split, seed=params["seed"], flip=False, conditional=True),
            batch_size=net_cfg["batch_size"], updates=net_cfg["updates"], lr_lambda=warmup_constant(0),
            grad_clip_norm=None, checkpoint_every=max(1, net_cfg["updates"] // 4), seed=params["seed"],
            stream=stage_stream(name), log_path=training_log_path(params),
        )
        if s.is_writer:
            net.eval()
            acc_held = _accuracy(net, open_training_split(params["inputs"]["heldout"]), s.device)
            acc_train = _accuracy(net, split, s.device)
            out = fresh_dir(params["outputs"]["dir"])
            config = {"resolution": resolution, "feature_dim": net_cfg["feature_dim"], "width": net_cfg["width"],
                      "channels": channels}
            save_digits_cnn(out / "model.pt", net.cpu(), config=config)
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, "heldout_accuracy": round(acc_held, 6),
                                                      "train_accuracy": round(acc_train, 6),
                                                      "loss_mean_recent": summary["loss_mean_recent"],
                                                      "machine": summary["machine"]})
            print(f"{name}: held-out accuracy {acc_held:.4f}")
