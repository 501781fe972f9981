"""Stage `classifier`: the frozen classifier C of CFD (Sun et al., ICME 2023; baselines.md §4), written as
`classifier.pt` for the CFD halvings (sferd/pipeline/stages/distill.py).

Two modes:

- trained (`digits-cnn`, `resnet18`, `densenet201`): cross-entropy on the training split, by the suite's training
  engine (data parallel, per-sample draws, resumable), with RCFD's recipe where the spec gives it: SGD with
  momentum, step decay of the lr at fractions of the run, weight decay, random crops (reflect padding, offsets from
  each sample's own draws) and the dataset's flips. At quickstart scale this is a digits CNN with its own seed, never
  the FID feature network: CFD trains the student to match the teacher in C's feature space, so with C = the FID
  features the student would be optimised on the very features FID measures, and its FID would flatter it.
- pretrained: torchvision's ImageNet weights from a local file, checked by SHA-256 before anything is built; a
  missing file is an error naming the file to fetch and where it goes (machines are offline: nothing downloads).

Either way the held-out accuracy is recorded when the classifier's classes are the dataset's: a classifier that
cannot tell the classes apart gives CFD nothing to distil.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from sferd.pipeline.stages.common import open_training_split, stage_stream, training_log_path
from sferd.util.artifacts import fresh_dir, write_json
from sferd.util.errors import StageError

EVAL_BATCH = 256
MAX_WEIGHTS_BYTES = 1 << 30  # densenet201's ImageNet file is ~78 MB; a wrong path (a disk image) is not read whole


def step_decay(updates: int, milestones: list[float], decay: float):
    """lr factor at update `step`: `decay` to the power of the milestones (fractions of the run) passed."""
    at = [int(round(m * updates)) for m in milestones]
    return lambda step: decay ** sum(step >= a for a in at)


def random_crop(x, padding: int, draws):
    """Pad by `padding` (reflect) and crop back at per-sample offsets (two draws per sample, in this order)."""
    import torch
    import torch.nn.functional as F

    if padding == 0:
        return x
    dy, dx = draws.randint(0, 2 * padding + 1), draws.randint(0, 2 * padding + 1)
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    return torch.stack([padded[k, :, int(a):int(a) + h, int(b):int(b) + w] for k, (a, b) in enumerate(zip(dy, dx))])


def accuracy(net, split, device) -> float:
    import numpy as np
    import torch

    from sferd.data.arrays import to_model_range

    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), EVAL_BATCH):
            rows = np.arange(i, min(i + EVAL_BATCH, len(split)))
            logits, _ = net(to_model_range(split.gather(rows), device))
            y = torch.from_numpy(np.asarray(split.labels[rows])).long().to(device)
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(split)


def _fetch_hint(base: str) -> str:
    try:
        import torchvision

        url = {"resnet18": torchvision.models.ResNet18_Weights,
               "densenet201": torchvision.models.DenseNet201_Weights}[base].IMAGENET1K_V1.url
        return f"fetch {url} on a connected machine"
    except Exception:  # noqa: BLE001 - only the hint depends on it
        return f"fetch torchvision's ImageNet weights of {base}"


def _read_verified(w: dict, base: str) -> bytes:
    path = Path(w["path"])
    if not path.is_file():
        raise StageError(f"pretrained classifier weights {path} not found: {_fetch_hint(base)} and put the file at "
                         f"{path} (its sha256 must be {w['sha256']}); this machine downloads nothing")
    with open(path, "rb") as f:
        data = f.read(MAX_WEIGHTS_BYTES + 1)
    if len(data) > MAX_WEIGHTS_BYTES:
        raise StageError(f"pretrained classifier weights {path} exceed {MAX_WEIGHTS_BYTES} bytes: not a {base} file")
    sha = hashlib.sha256(data).hexdigest()
    if sha != w["sha256"]:
        raise StageError(f"pretrained classifier weights {path} have sha256 {sha}, the spec expects {w['sha256']}: "
                         f"{_fetch_hint(base)} again, or fix the spec's classifier.sha256")
    return data


def _run_pretrained(name: str, params: dict) -> None:
    import torch

    from sferd.nn.classifiers import Classifier, save_classifier, torchvision_state_dict
    from sferd.util.distributed import launch
    from sferd.util.machine import machine_record

    if not launch().is_writer:
        return
    cfg = params["network"]
    data = _read_verified(params["weights"], cfg["architecture"])  # first: no model is built for a missing file
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net = Classifier(cfg)
        net.net.load_state_dict(torchvision_state_dict(state, cfg["architecture"]))
    except Exception as e:  # noqa: BLE001 - any failure means: not this architecture's plain state_dict
        raise StageError(f"pretrained classifier weights {params['weights']['path']} are not a torchvision "
                         f"{cfg['architecture']} state_dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    net.eval()
    acc = None
    if cfg["num_classes"] == params["num_classes"]:
        acc = round(accuracy(net, open_training_split(params["inputs"]["heldout"]), torch.device("cpu")), 6)
    out = fresh_dir(params["outputs"]["dir"])
    save_classifier(out / "classifier.pt", net)
    write_json(Path(out) / "config.json", params)
    write_json(params["outputs"]["metrics"], {"stage": name, "heldout_accuracy": acc,
                                              "weights_sha256": params["weights"]["sha256"],
                                              "machine": machine_record(world_size=1, precision="fp32")})


def run(name: str, params: dict) -> None:
    if params.get("weights") is not None:
        _run_pretrained(name, params)
        return
    import torch
    import torch.nn.functional as F

    from sferd.methods.training import ImageSource, Session
    from sferd.nn.classifiers import Classifier, save_classifier

    tr, cfg = params["training"], params["network"]
    with Session(name, params) as s:
        split = open_training_split(params["inputs"]["train"])
        if (split.channels, split.resolution) != (cfg["channels"], cfg["resolution"]):
            raise StageError(f"training split {params['inputs']['train']} holds {split.channels}×{split.resolution}² "
                             f"images, the classifier is for {cfg['channels']}×{cfg['resolution']}²: recompile the spec")
        torch.manual_seed(params["seed"])  # the initial weights: the spec's classifier seed
        net = Classifier(cfg).to(s.device)
        if tr["optimizer"] == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=tr["lr"], momentum=tr["momentum"],
                                  weight_decay=tr["weight_decay"])
        else:
            opt = torch.optim.Adam(net.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"])
        pad = tr["random_crop_padding"]

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, batch):
                logits, _ = self.net(random_crop(batch.x0, pad, batch.draws))
                return F.cross_entropy(logits, batch.y, reduction="none")

        summary = s.train(
            module=Loss(), trainable=net, optimizer=opt,
            source=ImageSource(split, seed=params["seed"], flip=params["dataset"]["random_flip"], conditional=True),
            batch_size=tr["batch_size"], updates=tr["updates"],
            lr_lambda=step_decay(tr["updates"], tr["lr_milestones"], tr["lr_decay"]), grad_clip_norm=None,
            checkpoint_every=tr["checkpoint_every_updates"], seed=params["seed"], stream=stage_stream(name),
            log_path=training_log_path(params),
        )
        if s.is_writer:
            net.eval()
            acc = accuracy(net, open_training_split(params["inputs"]["heldout"]), s.device)
            out = fresh_dir(params["outputs"]["dir"])
            save_classifier(out / "classifier.pt", net.cpu())
            write_json(Path(out) / "config.json", params)
            write_json(params["outputs"]["metrics"], {"stage": name, "heldout_accuracy": round(acc, 6), **summary})
            print(f"{name}: held-out accuracy {acc:.4f}")
