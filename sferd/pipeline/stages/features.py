"""Stage `features`: the quickstart's FID feature network (a digits classifier; the same small CNN on the spec's own
images when a paper spec runs at smoke scale).

Inception weights cannot be downloaded offline and mean little on 8×8 grey digits, so the quickstart's FID
uses the pooled features of a small CNN trained on the training split and registered with torch-fidelity.

Two modes (issue 11, part 5: "a metric that does not move between machines"):

- `weights` given (the quickstart): a fixed, versioned file committed to git, like Inception's weights. CPU float
  results differ between machines, so weights trained on each machine would give FIDs that cannot be compared;
  here the stage trains nothing. It checks the file's SHA-256 against the spec, loads it with weights_only, checks
  its recorded architecture, dataset and training settings against the spec, measures its accuracy on this
  machine's splits and writes a byte copy as `model.pt`. New weights are a new version, written by the explicit
  `sferd-spec features-train SPEC --version V` (which runs `train_network` below, exactly as this stage would).
- `weights` null (paper specs at smoke scale, on CIFAR images): trained here, by the same engine as every other
  training stage (data parallel, per-sample draws, resumable). Such weights are machine-dependent.

Either way the held-out accuracy is recorded: features of a classifier that cannot tell digits apart would make
every FID meaningless.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sferd.pipeline.stages.common import open_training_split, stage_stream, training_log_path
from sferd.util.artifacts import atomic_dir, atomic_write_bytes, fresh_dir, write_json
from sferd.util.errors import StageError

EVAL_BATCH = 512
# A DigitsCNN file is ~270 KB at the quickstart's size; the bound keeps a wrong path (a disk image) from being read
# whole into memory before its hash says it is the wrong file.
MAX_WEIGHTS_BYTES = 256 << 20
# The training settings a versioned file records and the stage compares with the spec's `features` block.
TRAINING_KEYS = ("updates", "batch_size", "lr")
# The dataset fields the weights depend on: the images (id) and which of them were the training split.
DATASET_KEYS = ("id", "heldout_fraction", "split_seed")


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


@dataclass
class Trained:
    """What `train_network` hands its `write` callback on the writer rank: the CPU network in eval mode, its
    architecture config, accuracies on both splits and the engine's summary (final loss, machine record)."""

    net: Any
    config: dict[str, int]
    heldout_accuracy: float
    train_accuracy: float
    summary: dict[str, Any]


def train_network(name: str, params: dict, write: Callable[[Trained], None], *, root: str | Path = ".") -> None:
    """Train the feature network as the `features` stage does: `params` are that stage's resolved params (inputs:
    the data stage's `train` and `heldout` split folders). `name` seeds the per-sample draws (`stage_stream`), so
    `sferd-spec features-train` passes the stage's own name and gets the weights this stage would train.
    `write(trained)` runs on the writer rank inside the session, i.e. before the resumable scratch state (under
    `root`/.sferd/scratch/<name>) is cleared: a crash while writing resumes instead of retraining."""
    import torch
    import torch.nn.functional as F

    from sferd.methods.training import ImageSource, Session, warmup_constant
    from sferd.nn.digits_cnn import DigitsCNN

    net_cfg = params["network"]
    with Session(name, params, root=root) as s:
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
        if not s.is_writer:
            return
        net.eval()
        acc_held = _accuracy(net, open_training_split(params["inputs"]["heldout"]), s.device)
        acc_train = _accuracy(net, split, s.device)
        config = {"resolution": resolution, "feature_dim": net_cfg["feature_dim"], "width": net_cfg["width"],
                  "channels": channels}
        write(Trained(net.cpu(), config, acc_held, acc_train, summary))


def weights_record(params: dict) -> dict[str, Any]:
    """What a versioned weights file records beside its architecture: the data it was trained on and how, so the
    stage can tell a file that does not belong to the spec (and `features-train` writes exactly this)."""
    ds, net_cfg = params["dataset"], params["network"]
    return {"dataset": {k: ds[k] for k in DATASET_KEYS}, "training": {k: net_cfg[k] for k in TRAINING_KEYS},
            "seed": params["seed"], "precision": params["precision"]}


def _read_verified(w: dict) -> tuple[bytes, str]:
    """The weights file's bytes, read once (hash, load and copy all use these bytes: nothing can swap the file in
    between), and their SHA-256, which must be the spec's."""
    path = Path(w["path"])
    retrain = "`sferd-spec features-train SPEC --version NEW` writes a new version"
    if not path.is_file():
        raise StageError(f"feature-network weights {path} (version {w['version']}) not found: restore it from git "
                         f"(`git checkout -- {path}`) or fix `features.weights` in the spec ({retrain})")
    with open(path, "rb") as f:
        data = f.read(MAX_WEIGHTS_BYTES + 1)
    if len(data) > MAX_WEIGHTS_BYTES:
        raise StageError(f"feature-network weights {path} exceed {MAX_WEIGHTS_BYTES} bytes: not a digits-cnn file")
    sha = hashlib.sha256(data).hexdigest()
    if sha != w["sha256"]:
        raise StageError(f"feature-network weights {path} have sha256 {sha}, the spec (features.weights, version "
                         f"{w['version']}) expects {w['sha256']}: restore the committed file (`git checkout -- {path}`); "
                         f"weights are never replaced in place, {retrain}")
    return data, sha


def _check_record(path: str, config: dict, params: dict, channels: int, resolution: int) -> None:
    """The file's recorded config against the spec and this dataset: architecture, data, training settings."""
    w, net_cfg = params["weights"], params["network"]
    want = {"feature_dim": net_cfg["feature_dim"], "width": net_cfg["width"], "channels": channels,
            "resolution": resolution}
    got = {k: config.get(k, 1 if k == "channels" else None) for k in want}  # files without `channels` are grey
    wrong = [f"{k} {got[k]} (spec/dataset: {v})" for k, v in want.items() if got[k] != v]
    if wrong:
        raise StageError(f"feature-network weights {path} are for another network: {', '.join(wrong)}; point "
                         "`features.weights` at weights for this spec or retrain with `sferd-spec features-train`")
    if config.get("version") != w["version"]:
        raise StageError(f"feature-network weights {path} record version {config.get('version')!r}, the spec says "
                         f"{w['version']!r}: fix `features.weights.version`")
    expected = weights_record(params)
    for part in ("dataset", "training"):
        rec = config.get(part)
        if not isinstance(rec, dict):
            raise StageError(f"feature-network weights {path} record no {part} settings: not a file written by "
                             "`sferd-spec features-train`; retrain with it")
        diff = [f"{k} {rec.get(k)!r} (spec: {v!r})" for k, v in expected[part].items() if rec.get(k) != v]
        if diff:
            where = "dataset" if part == "dataset" else "features"
            raise StageError(f"feature-network weights {path} were trained with {part} {', '.join(diff)}: the spec's "
                             f"`{where}` block must say how its weights were trained; restore those settings or "
                             "retrain a new version with `sferd-spec features-train`")


def _run_fixed(name: str, params: dict) -> None:
    """Verify and use the spec's versioned weights; nothing is written unless every check passes."""
    import torch

    from sferd.nn.digits_cnn import NUM_CLASSES, digits_cnn_from_checkpoint
    from sferd.util.distributed import launch
    from sferd.util.machine import machine_record

    proc = launch()
    if not proc.is_writer:  # nothing to train: the writer checks and measures alone
        return
    w = params["weights"]
    data, sha = _read_verified(w)
    path = w["path"]
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a plain tensor file
        raise StageError(f"feature-network weights {path} do not load with torch.load(weights_only=True) "
                         f"({type(e).__name__}): not a digits-cnn file") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict):
        raise StageError(f"feature-network weights {path}: not a digits-cnn checkpoint (no config)")
    train = open_training_split(params["inputs"]["train"])
    held = open_training_split(params["inputs"]["heldout"])
    _check_record(path, blob["config"], params, train.channels, train.resolution)
    try:
        net = digits_cnn_from_checkpoint(blob, source=path)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise StageError(f"feature-network weights {path}: {str(e).splitlines()[0]}") from None
    if net.classifier.out_features != NUM_CLASSES:  # pragma: no cover - DigitsCNN always has 10; kept explicit
        raise StageError(f"feature-network weights {path} classify {net.classifier.out_features} classes, not 10")
    labels_max = max(int(train.labels[:].max()), int(held.labels[:].max()))
    if labels_max >= NUM_CLASSES:
        raise StageError(f"dataset {params['dataset']['id']} has label {labels_max}: the digits-cnn has "
                         f"{NUM_CLASSES} classes")
    acc_held = _accuracy(net, held, torch.device("cpu"))
    acc_train = _accuracy(net, train, torch.device("cpu"))
    with atomic_dir(params["outputs"]["dir"]) as out:  # all or nothing: a reader never sees a partial folder
        atomic_write_bytes(out / "model.pt", data)  # the verified bytes themselves: same hash as the spec's
        write_json(out / "config.json", params)
    write_json(params["outputs"]["metrics"], {
        "stage": name, "weights_version": w["version"], "weights_sha256": sha, "weights_path": path,
        "heldout_accuracy": round(acc_held, 6), "train_accuracy": round(acc_train, 6),
        # what features-train measured where the weights were made: a large gap to the value above means this
        # machine's data split differs, not the weights (their hash is checked)
        "heldout_accuracy_recorded": blob["config"].get("heldout_accuracy"),
        "machine": machine_record(world_size=1, precision="fp32"),
    })
    print(f"{name}: weights {w['version']} (sha256 {sha[:12]}…) verified, held-out accuracy {acc_held:.4f}")


def run(name: str, params: dict) -> None:
    if params.get("weights") is not None:
        _run_fixed(name, params)
        return
    from sferd.nn.digits_cnn import save_digits_cnn

    def write(trained: Trained) -> None:
        out = fresh_dir(params["outputs"]["dir"])
        save_digits_cnn(out / "model.pt", trained.net, config=trained.config)
        write_json(Path(out) / "config.json", params)
        write_json(params["outputs"]["metrics"], {"stage": name, "heldout_accuracy": round(trained.heldout_accuracy, 6),
                                                  "train_accuracy": round(trained.train_accuracy, 6),
                                                  "loss_mean_recent": trained.summary["loss_mean_recent"],
                                                  "machine": trained.summary["machine"]})
        print(f"{name}: held-out accuracy {trained.heldout_accuracy:.4f}")

    train_network(name, params, write)
