"""FID sampling sharded over processes gives the samples of one process, byte for byte.

The partition and the merge are checked on their own, then with real sampling in-process (every rank's shard
computed here, no process group), then for real: the FID stage's own command, the launcher
`python -m sferd.pipeline.launch`, set to 2 processes (it starts torchrun; gloo, CPU) against the same stage in
this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sferd.nn.build import build_unet
from sferd.util.distributed import Launch, launch, merge_shards, shard_slices
from sferd.util.errors import StageError

pytestmark = pytest.mark.usefixtures("single_thread")  # torchrun's workers run with OMP_NUM_THREADS=1 too

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
MODEL = {
    "in_channels": 1, "out_channels": 1, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 1, "head_channels": None, "dropout": 0.0,
    "num_classes": 3, "norm_groups": 4,
}  # class-conditional, so the gathered labels are not all −1


# ------------------------------------------------------------------------------------------------ partition


@pytest.mark.parametrize("n,batch,world", [(10, 3, 1), (10, 3, 2), (10, 3, 3), (10, 3, 4), (10, 3, 7),
                                           (64, 16, 2), (65, 16, 8), (1, 5, 2), (7, 7, 3)])
def test_shard_slices_split_the_one_process_batches(n, batch, world):
    one_process = shard_slices(n, batch, 0, 1)
    assert [(s.start, s.stop) for s in one_process] == [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
    per_rank = [shard_slices(n, batch, r, world) for r in range(world)]
    # rank order = batch order: every position once, each batch with the members it has in one process
    assert [s for shard in per_rank for s in shard] == one_process
    assert np.array_equal(np.concatenate([np.arange(s.start, s.stop) for sh in per_rank for s in sh]), np.arange(n))
    sizes = [len(shard) for shard in per_rank]
    assert max(sizes) - min(sizes) <= 1 and all(s.stop - s.start <= batch for sh in per_rank for s in sh)


def test_shard_slices_rejects_bad_arguments():
    for args in [(10, 0, 0, 1), (10, 3, 2, 2), (10, 3, -1, 2)]:
        with pytest.raises(ValueError):
            shard_slices(*args)


def _shard(positions, n_features=2):
    positions = np.asarray(positions, dtype=np.int64)
    return {"positions": positions, "images": np.stack([positions * 10 + j for j in range(n_features)], axis=1),
            "labels": positions % 3}


def test_merge_shards_restores_seed_order():
    shards = [_shard([4, 5]), _shard([]), _shard([0, 1, 2]), _shard([6, 3])]
    merged = merge_shards(shards, 7)
    assert set(merged) == {"images", "labels"}
    np.testing.assert_array_equal(merged["images"], np.stack([np.arange(7) * 10, np.arange(7) * 10 + 1], axis=1))
    np.testing.assert_array_equal(merged["labels"], np.arange(7) % 3)


@pytest.mark.parametrize("shards", [[_shard([0, 1]), _shard([1, 2])],   # a batch twice, one missing
                                    [_shard([0, 1]), _shard([3])],      # a gap
                                    [_shard([0, 1, 2, 3])]])            # one too many
def test_merge_shards_refuses_anything_but_each_position_once(shards):
    with pytest.raises(RuntimeError, match="exactly once"):
        merge_shards(shards, 3)


def test_launch_reads_torchrun_environment():
    assert launch({}) == Launch() and not launch({}).sharded
    assert launch({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == Launch()
    got = launch({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert got == Launch(rank=3, world_size=4, local_rank=1, local_world_size=4) and got.sharded and not got.is_main
    # two nodes of two: the first process of each node writes its node's outputs
    node1 = launch({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert node1.multi_node and node1.is_writer and not node1.is_main
    assert not got.multi_node and not got.is_writer
    assert launch({}).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(StageError, match="RANK is not"):
        launch({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(StageError, match="outside"):
        launch({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


# ------------------------------------------------------------------------------------------------ sampling


def _checkpoint(path: Path, model=MODEL, seed=0) -> str:
    torch.manual_seed(seed)
    net = build_unet(model)
    with torch.no_grad():  # zero-initialised output layers would make every image flat grey
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": {"model": model}}, path)
    return str(path)


def _sferd_source(tmp_path: Path, ckpt: str) -> dict:
    """A SFERD source with random (seeded) predictor and prior checkpoints: shifted student + latent stream."""
    from sferd.methods.latent_prior import LatentStats
    from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig
    from sferd.nn.predictor import GradientPredictor
    from sferd.pipeline.stages.common import load_model

    torch.manual_seed(1)
    predictor = GradientPredictor(load_model(ckpt, MODEL), latent_dim=4)
    with torch.no_grad():  # the head starts at zero (G ≡ 0): perturb it so the shift changes the images
        for p in predictor.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    mlp_config = {"latent_dim": 4, "width": 16, "num_layers": 2, "time_emb_dim": 8, "num_classes": 3}
    torch.save({"predictor": predictor.state_dict_own(), "config": {"student": {"checkpoint": ckpt}}},
               tmp_path / "predictor.pt")
    torch.save({"mlp": LatentMLP(LatentMLPConfig(**mlp_config)).state_dict(), "mlp_config": mlp_config,
                "stats": LatentStats(mean=torch.zeros(4), std=torch.ones(4)).state_dict()}, tmp_path / "prior.pt")
    return {"kind": "sferd", "checkpoint": ckpt, "model": MODEL, "parameterization": "x",
            "predictor": {"checkpoint": str(tmp_path / "predictor.pt"), "latent_dim": 4, "init_from_student": False,
                          "shift_cutoff_fraction": 0.3, "shift_parameterization": "x0_tweedie"},
            "prior": {"checkpoint": str(tmp_path / "prior.pt"), "sampling_steps": 3, "clip_noise": 1.0, "clip_x0": 1.0}}


@pytest.mark.parametrize("kind", ["fid", "fid_sferd"])
def test_sharded_sampling_in_process_equals_one_process(tmp_path, kind):
    """Each rank's shard computed here (no process group), merged as rank 0 merges: the one-process arrays."""
    from sferd.pipeline.stages import fid, fid_sferd

    ckpt = _checkpoint(tmp_path / "model.pt")
    src = {"kind": "model", "checkpoint": ckpt, "model": MODEL, "parameterization": "x"}
    make_sampler = None
    if kind == "fid_sferd":
        src, make_sampler = _sferd_source(tmp_path, ckpt), fid_sferd.make_sampler
    params = {"source": src, "steps": 2, "sample_batch_size": 3, "image_shape": [1, 8, 8]}  # as graph.py writes
    seeds = np.arange(5, 15, dtype=np.int64)  # 10 samples in 4 batches: uneven shares, a short last batch
    images, labels = fid._sample_model(params, seeds, "one", make_sampler)
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    # the class of sample k comes from its own seed (unchanged by this work: a sharded run must keep it)
    assert labels.tolist() == [int(np.random.default_rng([int(k), 1]).integers(3)) for k in seeds]
    assert len(set(labels.tolist())) > 1
    for world in (2, 3, 5):  # 5 ranks, 4 batches: one rank samples nothing
        shards = [fid._sample_shard(params, seeds, "shard", make_sampler, Launch(rank=r, world_size=world))
                  for r in range(world)]
        merged = merge_shards([{k: v.numpy() for k, v in s.items()} for s in shards], len(seeds))
        assert merged["images"].tobytes() == images.tobytes(), world
        np.testing.assert_array_equal(merged["labels"], labels)


# ------------------------------------------------------------------------------------------------ torchrun


def _stage_inputs(d: Path) -> dict:
    """Training split, random digits-CNN weights and the reference-statistics stage run here: what an FID
    stage reads besides its model."""
    from fakes import write_split_arrays
    from sferd.nn.digits_cnn import DigitsCNN, save_digits_cnn
    from sferd.pipeline.run import main

    rng = np.random.default_rng(0)
    write_split_arrays(d / "results/data/train", rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                       rng.integers(0, 3, 40))
    torch.manual_seed(0)
    net = DigitsCNN(8, feature_dim=8, width=8)
    save_digits_cnn(d / "results/features/model.pt", net, config=net.config)
    common = {"feature_extractor": "digits-cnn", "feature_weights": "results/features/model.pt"}
    reference = {"name": "train", "path": "results/data/train"}
    (d / "params.json").write_text(json.dumps({"ref": {"kind": "reference", **common, "reference": reference,
                                                       "batch_size": 64, "outputs": {"dir": "results/ref"}}}))
    assert main(["ref"]) == 0
    return {**common, "reference": {**reference, "stats_dir": "results/ref"}}


def _fid_params(common: dict, ckpt: str, out: str) -> dict:
    return {
        "kind": "fid", "row": "teacher", "steps": 2, **common,
        "source": {"kind": "model", "checkpoint": ckpt, "model": MODEL, "parameterization": "x"},
        "num_samples": 11, "sample_seed_start": 100, "sample_batch_size": 4,  # 3 batches over 2 ranks
        "image_shape": [1, 8, 8], "outputs": {"dir": f"results/{out}", "metrics": f"results/metrics/{out}.json"},
    }


def _two_fid_stages(d: Path) -> None:
    """params.json with the reference stage (already run) and two FID stages that differ only in their outputs."""
    common = _stage_inputs(d)
    _checkpoint(d / "results/teacher/model.pt")
    stages = json.loads((d / "params.json").read_text())
    stages.update({s: _fid_params(common, "results/teacher/model.pt", s) for s in ("one", "two")})
    (d / "params.json").write_text(json.dumps(stages))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFERD_")}  # no stray runtime settings
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


def _torchrun(d: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args], cwd=d, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _launcher(d: Path, stage: str, **settings: str) -> subprocess.CompletedProcess:
    """The stage's DVC command (`python -m sferd.pipeline.launch STAGE`) with runtime settings in the environment."""
    return subprocess.run([sys.executable, "-m", "sferd.pipeline.launch", stage], cwd=d, env={**_env(), **settings},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("settings", [pytest.param({"SFERD_NPROC_PER_NODE": "2"}, id="environment"),
                                      pytest.param({"file": "nproc_per_node = 2\n"}, id="local-file",
                                                   marks=pytest.mark.slow)])
def test_fid_stage_through_the_launcher_at_2_processes_equals_one_process(tmp_path, monkeypatch, settings):
    """The stage's own command with the launcher set to 2 processes (it starts torchrun; gloo): samples.npz and
    the FID record equal the one-process run's, and rank 0 alone wrote them."""
    from sferd.pipeline.run import main

    monkeypatch.chdir(tmp_path)
    _two_fid_stages(tmp_path)
    assert main(["one"]) == 0
    if "file" in settings:
        (tmp_path / "sferd.local.toml").write_text(settings.pop("file"))
    r = _launcher(tmp_path, "two", **settings)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("two: FID") == 1 and "[rank 0 of 2]" in r.stderr, r.stdout + r.stderr

    one, two = (np.load(tmp_path / f"results/{s}/samples.npz") for s in ("one", "two"))
    for key in ("images", "labels", "seeds"):
        assert one[key].dtype == two[key].dtype and one[key].shape == two[key].shape, key
        assert one[key].tobytes() == two[key].tobytes(), key
    assert one["seeds"].tolist() == list(range(100, 111)) and len(set(one["labels"].tolist())) > 1
    assert (tmp_path / "results/one/samples.npz").read_bytes() == (tmp_path / "results/two/samples.npz").read_bytes()
    assert sorted(p.name for p in (tmp_path / "results/two").iterdir()) == ["samples.npz"]  # no shard leftovers
    m1, m2 = (json.loads((tmp_path / f"results/metrics/{s}.json").read_text()) for s in ("one", "two"))
    assert m1.pop("stage") == "one" and m2.pop("stage") == "two"
    # the machine records differ in the process count alone (both ran with one thread per process)
    mach1, mach2 = m1.pop("machine"), m2.pop("machine")
    assert (mach1["world_size"], mach2["world_size"]) == (1, 2) and {**mach1, "world_size": 2} == mach2
    assert m1 == m2


FAIL_ON_RANK_1 = """
import sys
from sferd.pipeline.run import main
from sferd.pipeline.stages import fid

sample_shard = fid._sample_shard
def failing(params, seeds, label, make_sampler, proc):
    if proc.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return sample_shard(params, seeds, label, make_sampler, proc)
fid._sample_shard = failing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_failure_on_another_rank_leaves_no_outputs(tmp_path, monkeypatch):
    """Rank 1 fails while rank 0 waits at the gather: torchrun stops rank 0, the stage fails, and no
    samples.npz or metrics file exists (neither a stale one nor a partial one)."""
    monkeypatch.chdir(tmp_path)
    _two_fid_stages(tmp_path)
    out = tmp_path / "results/two"
    out.mkdir(parents=True)
    (out / "samples.npz").write_bytes(b"from an earlier run")
    (tmp_path / "fail.py").write_text(FAIL_ON_RANK_1)
    r = _torchrun(tmp_path, "fail.py", "two")
    assert r.returncode != 0 and "injected failure on rank 1" in r.stdout + r.stderr, r.stdout + r.stderr
    assert list(out.iterdir()) == [] and not (tmp_path / "results/metrics/two.json").exists()
