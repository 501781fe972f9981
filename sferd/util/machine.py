"""What machine a number was measured on (issue 9, item 8).

Results differ between CPU models and GPU kinds (float summation order, kernels chosen by shape and hardware), so
every metrics file says where it was made. The record holds only what is fixed for one machine and launch: no
timestamps, no hostnames, no load figures, so a metrics file written twice on one machine is the same bytes
(DVC sees no change, git shows no diff).
"""

from __future__ import annotations

import platform
from pathlib import Path

KEY = "machine"  # the metrics-file key holding the record
PRECISIONS = ("fp32", "bf16")


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"); `platform.processor()` when /proc/cpuinfo has none (macOS,
    some ARM kernels); "unknown CPU" as the last resort, never an empty string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            # x86: "model name"; some ARM kernels: "Hardware" or "Processor"
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_record(*, world_size: int, precision: str) -> dict:
    """The record a metrics file stores under `"machine"`.

    `device_name` is the CUDA device's name when CUDA is available (the device every rank of a stage runs on,
    DESIGN.md "Scale"), else the CPU model; `device_count` counts CUDA devices, or 1 for the CPU. `cpu_threads` is
    torch's intra-op thread count: on a CPU it changes the float summation order and so the last digits.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    cuda = torch.cuda.is_available()
    return {
        "torch": str(torch.__version__),  # TorchVersion is a str subclass; JSON and == want the plain str
        "device_type": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_model(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_model": cpu_model(),
        "cpu_threads": int(torch.get_num_threads()),
        "world_size": world_size,
        "precision": precision,
    }


def describe(record: dict) -> str:
    """One line for a table footer or a benchmark header, e.g. "torch 2.14.1, CPU Intel Xeon, 2 threads, 1 process,
    fp32" or "torch 2.14.1, 8× NVIDIA A100-SXM4-80GB, 8 processes, bf16"."""
    ws = record["world_size"]
    if record["device_type"] == "cuda":
        n = record["device_count"]
        device = f"{n}× {record['device_name']}" if n != 1 else record["device_name"]
        device += f" (CPU {record['cpu_model']}, {record['cpu_threads']} thread{'s' if record['cpu_threads'] != 1 else ''})"
    else:
        t = record["cpu_threads"]
        device = f"CPU {record['device_name']}, {t} thread{'s' if t != 1 else ''}"
    return (f"torch {record['torch']}, {device}, {ws} process{'es' if ws != 1 else ''}, "
            f"{record['precision']}")
