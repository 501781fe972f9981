"""Stage `fid`: draw one sample set and measure its FID against the reference split (DESIGN.md step 5).

Sources: a model sampled with DDIM (teacher or student), or a calibration set (held-out real images: the
floor; Gaussian noise images: the ceiling). Samples are saved as one .npz (uint8 N×H×W×C, labels, seeds)
so FID can be recomputed with another implementation without resampling. Sample k uses seed
`sample_seed_start + k` for its noise and class, so the set does not depend on batch size or sharding.
Under torchrun each rank samples whole batches of the one-process batch list and rank 0 gathers them
(sferd/util/distributed.py): samples.npz is the same bytes for any number of processes.
The metrics file records which FID, on what, with which seeds — the number is meaningless without it — and
on which machine (`"machine"`: torch, device, process count, precision, CPU threads; sferd/util/machine.py).
When the spec asks for them, the same stage adds the Inception Score and precision/recall (torch-fidelity's
implementations, same extractor) and the settings they were computed with.
"""

from __future__ import annotations

import numpy as np

from sferd.metrics import keys
from sferd.data.store import open_split, reading_the_map
from sferd.util.artifacts import fresh_dir, write_json, write_npz
from sferd.util.distributed import (Launch, gather_to_main, launch, merge_shards, process_group, shard_slices,
                                    share_with_node_writers)
from sferd.util.errors import StageError
from sferd.util.machine import KEY as MACHINE, machine_record
from sferd.pipeline.stages.common import load_model


def _reference_statistics(reference: dict, weights_sha256: str) -> dict:
    """The reference-statistics stage's output, checked against the weights this stage measures with."""
    import json
    from pathlib import Path

    folder = Path(reference["stats_dir"])
    info_path = folder / "stats.json"
    if not info_path.is_file():
        raise StageError(f"no reference statistics in {folder}: run `dvc repro {folder.name}` first")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info[keys.WEIGHTS_SHA256] != weights_sha256:
        raise StageError(f"reference statistics in {folder} were computed with other extractor weights: "
                         f"re-run `dvc repro {folder.name}`")
    with np.load(folder / info["file"], allow_pickle=False) as z:
        return {"mu": z["mu"], "sigma": z["sigma"], "ref_sha256": info[keys.REF_SHA256]}


def _reference_images(reference: dict, ref_sha256: str) -> np.ndarray:
    """The reference images themselves (precision/recall compare against real-image features, not statistics),
    checked to be the very split the reference statistics were computed from: its read-only memory map, read in
    order by the feature extractor, never copied whole."""
    path = reference["path"]
    split = open_split(path)
    if split.sha256() != ref_sha256:
        raise StageError(f"{path} is not the reference set the statistics in {reference['stats_dir']} were computed "
                         f"from: re-run the reference-statistics stage")
    return split.images


SAMPLED = ("model", "sferd", "cld")  # sources drawn from a model: the part a sharded launch splits across ranks
SOURCES = SAMPLED + ("heldout", "noise")


def seed_range(start: int, n: int) -> str:
    return f"{start}-{start + n - 1}"


def _sample_model(params: dict, seeds: np.ndarray, label: str, make_sampler=None,
                  proc: Launch | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) in seed order on rank 0, None on the other ranks of a sharded launch."""
    proc = proc or Launch()
    with process_group(proc):
        shard = _sample_shard(params, seeds, label, make_sampler, proc)
        shards = gather_to_main(proc, shard)
        merged = (merge_shards([{k: v.numpy() for k, v in s.items()} for s in shards], len(seeds))
                  if shards is not None else None)
        if proc.multi_node:  # every node's writer gets the samples (as tensors: weights-only unpickling)
            import torch

            box = {k: torch.from_numpy(merged[k]) for k in ("images", "labels")} if merged is not None else None
            box = share_with_node_writers(proc, box)
            merged = {k: v.numpy() for k, v in box.items()} if box is not None else None
    if merged is None:
        return None
    return merged["images"], merged["labels"]


def _sample_shard(params: dict, seeds: np.ndarray, label: str, make_sampler, proc: Launch) -> dict:
    """This rank's batches of the seed list: {positions, images, labels} as CPU tensors (what the gather sends)."""
    import torch

    from sferd.diffusion.denoiser import NetworkDenoiser
    from sferd.diffusion.sampler import per_sample_noise, to_uint8
    from sferd.diffusion.basic_samplers import DDIM  # not the registry: see basic_samplers
    from sferd.util.progress import Progress

    src = params["source"]
    model_cfg = src["model"]
    device = proc.device
    from sferd.util.runtime import apply_backend_flags, runtime_settings

    apply_backend_flags(runtime_settings(), device)  # the machine's TF32 choice holds for sampling too
    net = load_model(src["checkpoint"], model_cfg).to(device)
    if make_sampler is not None:  # a method-specific sampler (SFERD: latent prior + shifted student)
        sample = make_sampler(src, net, params["steps"])
    else:
        denoiser = NetworkDenoiser(net, src["parameterization"])
        ddim = DDIM(clip=True)  # x̂₀ clipped at every step (PD's eval_clip_denoised)

        def sample(noise, seeds, y):
            return ddim(denoiser, noise, params["steps"], y=y)
    shape = (model_cfg["in_channels"], model_cfg["resolution"], model_cfg["resolution"])
    num_classes = model_cfg.get("num_classes")
    batches = shard_slices(len(seeds), params["sample_batch_size"], proc.rank, proc.world_size)
    # empty leaders: a rank may get no batch at all (more ranks than batches) and still sends well-shaped arrays
    # the images' shape, not the network's input's (a CLD network sees 2C channels and yields C-channel images)
    c, h, w = params["image_shape"]
    images, labels = [np.zeros((0, h, w, c), np.uint8)], [np.zeros(0, np.int64)]
    positions = [np.zeros(0, np.int64)] + [np.arange(b.start, b.stop, dtype=np.int64) for b in batches]
    # one bar, rank 0's: N processes drawing over each other would help nobody, and the shares differ by ≤ 1 batch
    progress = Progress(f"{label} [rank 0 of {proc.world_size}]" if proc.sharded else label,
                        sum(len(p) for p in positions)) if proc.is_main else None
    try:
        for b in batches:
            y = _class_labels(seeds[b], num_classes)
            noise = per_sample_noise(seeds[b], shape).to(device)  # drawn on the CPU: the same noise on any device
            images.append(to_uint8(sample(noise, seeds[b], torch.from_numpy(y).to(device) if num_classes else None)))
            labels.append(y)
            if progress is not None:
                progress.update(len(noise))
    finally:
        if progress is not None:
            progress.close()
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in
            (("positions", positions), ("images", images), ("labels", labels))}


def _class_labels(seeds: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Class of sample k from its own seed (a stream independent of its noise); −1 for unconditional models."""
    if not num_classes:
        return np.full(len(seeds), -1, dtype=np.int64)
    return np.array([np.random.default_rng([int(s), 1]).integers(num_classes) for s in seeds], dtype=np.int64)


def _noise_images(seeds: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    from sferd.diffusion.sampler import per_sample_noise, to_uint8

    return to_uint8(per_sample_noise(seeds, shape).clamp(-1, 1))


def _measuring_tools(params: dict):
    """(extractor weights, FID provenance, reference statistics), checked before any sampling: a missing
    extractor or stale statistics must not cost a sampling run. The weights are read once, here: the hash in the
    provenance is that of the tensors `measure_samples` later measures with, whatever happens to the file."""
    from sferd.metrics.fid import FeatureExtractorWeightsError, fid_provenance, load_feature_weights

    extractor = params["feature_extractor"]
    try:
        weights = load_feature_weights(extractor, params["feature_weights"])
        provenance = fid_provenance(feature_extractor=extractor, weights_path=weights)
    except FeatureExtractorWeightsError as e:
        raise StageError(str(e)) from e
    return weights, provenance, _reference_statistics(params["reference"], provenance[keys.WEIGHTS_SHA256])


def run(name: str, params: dict, *, make_sampler=None, extra_metrics=None) -> None:
    """`make_sampler(source, net, steps) -> sample(noise, seeds, y)` replaces DDIM for methods with their own
    sampler; `extra_metrics(params)` adds method-specific cost keys. The spec's extra metrics (IS, precision/recall)
    arrive as `params["extra_metrics"]`, absent when only FID is measured.

    Under torchrun (sferd/util/distributed.py) every rank samples its share of a model's seeds; rank 0
    alone checks the FID inputs, touches the outputs and measures (with several nodes, the first process of
    every node does, on the samples rank 0 shares with it, so each node's workspace gets the same outputs). If its checks fail it exits before joining
    the process group, and torchrun stops the ranks waiting there: nothing is sampled in vain.
    """
    src = params["source"]
    if src["kind"] not in SOURCES:
        raise StageError(f"unknown FID source {src['kind']!r}")
    start, n = params["sample_seed_start"], params["num_samples"]
    seeds = np.arange(start, start + n, dtype=np.int64)
    steps = params["steps"]
    proc = launch()
    if not proc.is_writer:  # sample this rank's share, hand it to rank 0 in the gather, done
        if src["kind"] in SAMPLED:
            _sample_model(params, seeds, name, make_sampler, proc)
        return
    from sferd.metrics.fid import extra_metrics_provenance, measure_samples  # rank 0 only: a slow import

    extractor = params["feature_extractor"]
    weights, provenance, ref_stats = _measuring_tools(params)
    metric_settings = params.get("extra_metrics", {})  # IS, precision/recall: only when the spec asks
    ref_images = (_reference_images(params["reference"], ref_stats["ref_sha256"])
                  if keys.METRIC_PRC in metric_settings else None)
    out = fresh_dir(params["outputs"]["dir"])

    extra: dict = extra_metrics(params) if extra_metrics is not None else {}
    if src["kind"] in SAMPLED:
        images, labels = _sample_model(params, seeds, name, make_sampler, proc)
        nfe = steps
    elif src["kind"] == "heldout":
        held = open_split(src["path"])  # a memory map: written to samples.npz and measured without a whole copy
        images, labels = held.images, held.labels
        seeds = np.full(len(images), -1, dtype=np.int64)  # real images: no sampling seed
        nfe = 0
    else:  # noise
        c, h, w = params["image_shape"]
        images, labels, nfe = _noise_images(seeds, (c, h, w)), np.full(n, -1, dtype=np.int64), 0
    write_npz(out / "samples.npz", images=images, labels=labels, seeds=seeds)

    try:
        with reading_the_map():  # held-out and reference images are the data split's read-only map
            values = measure_samples(images, ref_stats, feature_extractor=extractor, weights_path=weights,
                                     extra=metric_settings, reference_images=ref_images)
    except ValueError as e:  # too few images for a metric's setting (a calibration set smaller than planned)
        raise StageError(str(e)) from e
    fid = values[keys.FID]
    write_json(
        params["outputs"]["metrics"],
        {
            keys.STAGE: name,
            "row": params["row"],
            **values,  # fid, and the extra metrics' values when asked for
            keys.STEPS: steps,
            keys.NFE: nfe,
            **extra,
            keys.NUM_SAMPLES: int(len(images)),
            keys.SEEDS: seed_range(start, n) if src["kind"] != "heldout" else "real images",
            keys.REF: params["reference"]["name"],
            keys.REF_SHA256: ref_stats["ref_sha256"],
            **provenance,
            # the fixed feature weights' version (features.weights), beside their measured hash: the table footer
            # names it, so two tables' FIDs are comparable only when it matches. Absent for weights trained here.
            **({keys.WEIGHTS_VERSION: params["feature_weights_version"]}
               if params.get("feature_weights_version") is not None else {}),
            **extra_metrics_provenance(metric_settings,
                                       num_real=len(ref_images) if ref_images is not None else None),
            # sampling runs in fp32 (no autocast); world size: the processes that sampled this set
            MACHINE: machine_record(world_size=proc.world_size, precision="fp32"),
        },
    )
    print(f"{name}: FID {fid:.3f} ({len(images)} samples, {extractor})"
          + "".join(f", {k} {v:.3f}" for k, v in values.items() if k != keys.FID))
