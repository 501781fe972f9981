"""Stage `features`: train the quickstart's FID feature network (a digits classifier; the same small CNN on the
spec's own images when a paper spec runs at smoke scale).

Inception weights cannot be downloaded offline and mean little on 8×8 grey digits, so the quickstart's FID
uses the pooled features of a small CNN trained here on the training split and registered with
torch-fidelity. Its held-out accuracy is recorded: features of a classifier that cannot tell digits apart
would make every FID meaningless.
"""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import fresh_dir, read_npz, write_json


def run(name: str, params: dict) -> None:
    import torch
    import torch.nn.functional as F

    from sferd.data.arrays import BatchSampler, to_model_range
    from sferd.nn.digits_cnn import DigitsCNN, save_digits_cnn
    from sferd.util.progress import Progress
    from sferd.util.seeding import seed_everything

    net_cfg = params["network"]
    out = fresh_dir(params["outputs"]["dir"])
    seed_everything(params["seed"])
    train = read_npz(params["inputs"]["train"])
    held = read_npz(params["inputs"]["heldout"])
    x, y = to_model_range(train["images"]), torch.from_numpy(train["labels"]).long()
    xh, yh = to_model_range(held["images"]), torch.from_numpy(held["labels"]).long()
    channels, resolution = x.shape[1], x.shape[-1]

    net = DigitsCNN(resolution, feature_dim=net_cfg["feature_dim"], width=net_cfg["width"], channels=channels)
    opt = torch.optim.Adam(net.parameters(), lr=net_cfg["lr"])
    sampler = BatchSampler(x, y, net_cfg["batch_size"], seed=params["seed"] + 1, flip=False)
    progress = Progress(name, net_cfg["updates"])
    net.train()
    try:
        for _ in range(net_cfg["updates"]):
            xb, yb = sampler.next()
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.update(1, info=f"loss {loss.item():.3f}")
    finally:
        progress.close()
    net.eval()
    with torch.no_grad():
        acc_held = (net(xh).argmax(1) == yh).float().mean().item()
        acc_train = (net(x).argmax(1) == y).float().mean().item()
    config = {"resolution": resolution, "feature_dim": net_cfg["feature_dim"], "width": net_cfg["width"],
              "channels": channels}
    save_digits_cnn(out / "model.pt", net, config=config)
    write_json(Path(out) / "config.json", params)
    write_json(
        params["outputs"]["metrics"],
        {"stage": name, "heldout_accuracy": round(acc_held, 6), "train_accuracy": round(acc_train, 6)},
    )
    print(f"{name}: held-out accuracy {acc_held:.4f}")
