"""Machine provenance (issue 9, item 8): the record's keys and types, its stability, and the FID stage writing it."""

from __future__ import annotations

import json

import pytest
import torch

from sferd.util.machine import KEY, cpu_model, describe, machine_record

EXPECTED = {"torch": str, "device_type": str, "device_name": str, "device_count": int, "cpu_model": str,
            "cpu_threads": int, "world_size": int, "precision": str}


def test_record_keys_and_types():
    rec = machine_record(world_size=3, precision="bf16")
    assert set(rec) == set(EXPECTED)
    for k, t in EXPECTED.items():
        assert type(rec[k]) is t, (k, rec[k])
    assert rec["torch"] == torch.__version__ and rec["world_size"] == 3 and rec["precision"] == "bf16"
    assert rec["cpu_threads"] == torch.get_num_threads() >= 1
    if torch.cuda.is_available():
        assert rec["device_type"] == "cuda" and rec["device_name"] == torch.cuda.get_device_name(0)
        assert rec["device_count"] == torch.cuda.device_count()
    else:
        assert rec["device_type"] == "cpu" and rec["device_name"] == cpu_model() and rec["device_count"] == 1
    assert rec["cpu_model"] == cpu_model() != ""


def test_record_is_byte_stable_and_has_nothing_time_varying():
    a = json.dumps(machine_record(world_size=1, precision="fp32"), sort_keys=True)
    b = json.dumps(machine_record(world_size=1, precision="fp32"), sort_keys=True)
    assert a == b
    import socket

    assert socket.gethostname() not in machine_record(world_size=1, precision="fp32").values()


def test_threads_follow_torch(single_thread):
    assert machine_record(world_size=1, precision="fp32")["cpu_threads"] == 1


def test_cpu_model_reads_proc_cpuinfo_else_platform(monkeypatch, tmp_path):
    import sferd.util.machine as machine

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13 64-Core Processor\n")
    real_path = machine.Path

    monkeypatch.setattr(machine, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    assert cpu_model() == "AMD EPYC 7B13 64-Core Processor"
    monkeypatch.setattr(machine, "Path", lambda p: tmp_path / "absent")
    monkeypatch.setattr(machine.platform, "processor", lambda: "arm")
    assert cpu_model() == "arm"


@pytest.mark.parametrize("kw", [{"world_size": 0, "precision": "fp32"}, {"world_size": 1, "precision": "fp16"},
                                {"world_size": True, "precision": "fp32"}])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        machine_record(**kw)


def test_describe_cpu_and_cuda():
    cpu = {"torch": "2.14.1", "device_type": "cpu", "device_name": "AMD EPYC 7B13", "device_count": 1,
           "cpu_model": "AMD EPYC 7B13", "cpu_threads": 2, "world_size": 1, "precision": "fp32"}
    assert describe(cpu) == "torch 2.14.1, CPU AMD EPYC 7B13, 2 threads, 1 process, fp32"
    gpu = {**cpu, "device_type": "cuda", "device_name": "NVIDIA A100-SXM4-80GB", "device_count": 8, "world_size": 8,
           "precision": "bf16", "cpu_threads": 1}
    assert describe(gpu) == ("torch 2.14.1, 8× NVIDIA A100-SXM4-80GB (CPU AMD EPYC 7B13, 1 thread), 8 processes, bf16")


def test_fid_stage_writes_the_record(tmp_path, monkeypatch, single_thread):
    """The real FID stage through the stage runner: its metrics file holds this machine's record (1 process,
    fp32 sampling). The torchrun test in test_shard.py checks the 2-process record."""
    from test_shard import _two_fid_stages

    from sferd.pipeline.run import main

    monkeypatch.chdir(tmp_path)
    _two_fid_stages(tmp_path)
    assert main(["one"]) == 0
    m = json.loads((tmp_path / "results/metrics/one.json").read_text())
    assert m[KEY] == machine_record(world_size=1, precision="fp32")
