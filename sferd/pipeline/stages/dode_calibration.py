"""Stage `dode_calibration`: fit a D-ODE sampler's λ's for one student step count (Kim, Tang & Yu, CVPR 2024;
sferd.diffusion.dode) on the spec's teacher, and write them as JSON — the released code never saves them.

The calibration batch is one global batch: sample k draws its noise (and class) from seed + k in a stream of its
own (`CALIBRATION_STREAM`), never an FID sample's. It is cut into chunks of `chunk_size`; under torchrun each rank
takes whole chunks of that one list (`shard_slices`), runs the teacher solver and the greedy fit on them, and the
per-chunk normal-equation sums of every step are put back in chunk order on every rank (an all-reduce of a table
that holds each rank's rows and zeros elsewhere: adding zeros is exact) and summed one by one, as one process sums
its own chunks. Every chunk meets the network with the same members as in a 1-process run, so the λ's are
bit-identical for any number of processes, and every rank continues along the same corrected trajectory.

Besides the λ's the stage measures what they buy on the calibration batch itself: the mean squared distance to the
teacher's state after every step, of the base solver (λ = 0) and of the corrected one (metrics `mse_base_<i>`,
`mse_corrected_<i>`; the last step is the sample). On the batch the λ's were fitted to, the greedy fit can only
lower the error of the step it fits; later steps and other batches are what the FID stage measures.
"""

from __future__ import annotations

import numpy as np

from sferd.util.artifacts import fresh_dir, write_json
from sferd.util.distributed import Launch, launch, process_group, shard_slices
from sferd.util.errors import StageError
from sferd.util.machine import KEY as MACHINE, machine_record
from sferd.pipeline.stages.common import load_model

# Per-sample generators are seeded 16·seed + stream (sferd.diffusion.sampler.NOISE_STREAMS uses 0 and 1 of the
# 16): the calibration batch takes the last slot, so its noise is never an FID sample's noise of the same seed.
CALIBRATION_STREAM = 15


def calibration_noise(seeds: np.ndarray, shape: tuple[int, ...]):
    import torch

    out = torch.empty((len(seeds),) + tuple(shape))
    g = torch.Generator()
    for k, seed in enumerate(seeds):
        g.manual_seed(16 * int(seed) + CALIBRATION_STREAM)
        out[k] = torch.randn(shape, generator=g)
    return out


def calibration_labels(seeds: np.ndarray, num_classes: int | None) -> np.ndarray | None:
    if not num_classes:
        return None
    return np.array([np.random.default_rng([int(s), CALIBRATION_STREAM]).integers(num_classes) for s in seeds],
                    dtype=np.int64)


def _base(spec: dict, clip: bool):
    from sferd.diffusion.dode import BASES

    if spec["base"] not in BASES:
        raise StageError(f"unknown D-ODE base solver {spec['base']!r}; known: {sorted(BASES)}")
    return BASES[spec["base"]](clip=clip, **({"order": spec["order"]} if "order" in spec else {}))


def _chunk_gather(proc: Launch, positions: list[int], n_chunks: int):
    """rows (k×m, this rank's chunks) → every chunk's row (n×m, global chunk order), identical on every rank."""
    import torch

    def gather(rows: torch.Tensor) -> torch.Tensor:
        if not proc.sharded:
            return rows
        import torch.distributed as dist

        table = torch.zeros((n_chunks, rows.shape[1]), dtype=torch.float64)
        for k, pos in enumerate(positions):
            table[pos] = rows[k]
        on_device = table.to(proc.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()

    return gather


def load_teacher(params: dict, proc: Launch):
    t = params["teacher"]
    return load_model(t["checkpoint"], t["model"]).to(proc.device)


def calibrate(params: dict, proc: Launch, net) -> dict:
    """The λ record (every rank gets the same) and the measured trajectory errors, for the teacher network `net`."""
    import torch

    from sferd.diffusion import dode
    from sferd.diffusion.denoiser import NetworkDenoiser

    steps, factor, clip = params["student_steps"], params["factor"], params["clip"]
    if factor * steps != params["teacher_steps"]:
        raise StageError(f"teacher_steps {params['teacher_steps']} is not factor {factor} × {steps} student steps; "
                         "recompile with `sferd-spec compile`")
    t = params["teacher"]
    device = proc.device
    denoise = NetworkDenoiser(net, t["parameterization"])
    base, teacher = _base(params["sampler"], clip), _base(params["teacher_solver"], clip)

    n, chunk, seed = params["batch_size"], params["chunk_size"], params["seed"]
    seeds = np.arange(seed, seed + n, dtype=np.int64)
    n_chunks = len(range(0, n, chunk))
    mine = shard_slices(n, chunk, proc.rank, proc.world_size)  # whole chunks of the one global list
    positions = [sl.start // chunk for sl in mine]
    local_seeds = np.concatenate([seeds[sl] for sl in mine]) if mine else seeds[:0]
    local, at = [], 0
    for sl in mine:
        local.append(slice(at, at + sl.stop - sl.start))
        at += sl.stop - sl.start
    m = t["model"]
    shape = (m["in_channels"], m["resolution"], m["resolution"])
    noise = calibration_noise(local_seeds, shape).to(device)  # drawn on the CPU: the same noise on any device
    labels = calibration_labels(local_seeds, m.get("num_classes"))
    y = torch.from_numpy(labels).to(device) if labels is not None else None
    gather = _chunk_gather(proc, positions, n_chunks)

    if local:
        targets = dode.teacher_targets(teacher, denoise, noise, steps, factor=factor, y=y, chunks=local)
    else:  # more processes than chunks: this rank fits nothing and only joins the collectives
        targets = [noise[:0]] * steps
    cal = dode.fit_lambdas(base, denoise, noise, steps, targets, y=y, chunks=local, gather=gather, factor=factor)

    def trajectory_mse(lambdas) -> list[float]:
        """Mean squared distance to the teacher after every step, over the whole calibration batch."""
        sampler = dode.DODESampler(lambdas=lambdas, base=params["sampler"]["base"], clip=clip,
                                   **({"order": params["sampler"]["order"]} if "order" in params["sampler"] else {}))
        rows = []
        for sl in local:
            err = torch.zeros(steps, dtype=torch.float64)

            def callback(i, _t, x, sl=sl, err=err):
                err[i] = ((x.double() - targets[i][sl].double()) ** 2).sum().cpu()

            sampler(denoise, noise[sl], steps, y=None if y is None else y[sl], callback=callback)
            rows.append(err)
        table = gather(torch.stack(rows) if rows else torch.zeros((0, steps), dtype=torch.float64))
        total = torch.zeros(steps, dtype=torch.float64)
        for row in table:
            total += row
        per_image = n * int(np.prod(shape))
        return [float(v) / per_image for v in total]

    before = trajectory_mse([0.0] * steps)  # λ = 0 is the base solver to the last bit (sferd.diffusion.dode)
    after = trajectory_mse(cal.lambdas)
    return {"calibration": cal, "mse_base": before, "mse_corrected": after}


def run(name: str, params: dict) -> None:
    proc = launch()
    with process_group(proc):
        result = calibrate(params, proc, load_teacher(params, proc))
    if not proc.is_writer:
        return
    cal = result["calibration"]
    seeds = f"{params['seed']}-{params['seed'] + params['batch_size'] - 1}"
    record = {
        **cal.as_dict(),
        "stage": name,
        "student_steps": params["student_steps"],
        "sampler": params["sampler"],
        "teacher_solver": params["teacher_solver"],
        "teacher_steps": params["teacher_steps"],
        "clip": params["clip"],
        "batch_size": params["batch_size"],
        "seeds": seeds,
        "noise_stream": CALIBRATION_STREAM,
        "teacher_checkpoint": params["teacher"]["checkpoint"],
    }
    out = fresh_dir(params["outputs"]["dir"])
    write_json(out / "lambdas.json", record)
    metrics = {"stage": name, "student_steps": params["student_steps"], "teacher_steps": params["teacher_steps"],
               "factor": params["factor"], "batch_size": params["batch_size"], "seeds": seeds}
    for i, (lam, b, a) in enumerate(zip(cal.lambdas, result["mse_base"], result["mse_corrected"]), start=1):
        metrics[f"lambda_{i}"] = lam
        metrics[f"mse_base_{i}"] = b
        metrics[f"mse_corrected_{i}"] = a
    metrics["final_mse_base"] = result["mse_base"][-1]
    metrics["final_mse_corrected"] = result["mse_corrected"][-1]
    metrics[MACHINE] = machine_record(world_size=proc.world_size, precision="fp32")
    write_json(params["outputs"]["metrics"], metrics)
    print(f"{name}: λ = {', '.join(f'{v:.4g}' for v in cal.lambdas)}; trajectory MSE at the sample "
          f"{result['mse_base'][-1]:.4g} → {result['mse_corrected'][-1]:.4g}")
