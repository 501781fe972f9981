"""Machine-local runtime settings: environment over `sferd.local.toml`, strict values, one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from sferd.util.errors import StageError
from sferd.util.runtime import LOCAL_FILE, SETTINGS, Runtime, RuntimeSettingsError, runtime_settings

ROOT = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None) -> Runtime:
    if text is not None:
        (tmp_path / LOCAL_FILE).write_text(text)
    return runtime_settings(tmp_path, env or {})


def test_defaults_without_file_or_environment(tmp_path):
    rt = _settings(tmp_path)
    assert rt == Runtime() and rt.procs_per_node() == 1
    assert (rt.nproc_per_node, rt.nnodes, rt.rdzv_endpoint, rt.rdzv_id, rt.micro_batch, rt.tf32, rt.compile,
            rt.loader_workers) == (1, 1, None, "sferd", None, False, False, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rt.nnodes = 2  # type: ignore[misc]


def test_file_values_and_environment_wins_key_by_key(tmp_path):
    text = ('nproc_per_node = 4\nnnodes = 2\nrdzv_endpoint = "node0:29400"\nrdzv_id = "run-7"\nmicro_batch = 32\n'
            'tf32 = true\ncompile = true\nloader_workers = 3\n')
    assert _settings(tmp_path, text) == Runtime(4, 2, "node0:29400", "run-7", 32, True, True, 3)
    env = {"SFERD_NPROC_PER_NODE": "8", "SFERD_TF32": "0", "SFERD_LOADER_WORKERS": "0",
           "SFERD_RDZV_ENDPOINT": "10.0.0.1:1234"}
    assert _settings(tmp_path, env=env) == Runtime(8, 2, "10.0.0.1:1234", "run-7", 32, False, True, 0)
    # an empty variable counts as unset (the file's value stays)
    assert _settings(tmp_path, env={"SFERD_MICRO_BATCH": "", "SFERD_NNODES": ""}).micro_batch == 32


def test_environment_alone(tmp_path):
    env = {"SFERD_NPROC_PER_NODE": "2", "SFERD_NNODES": "3", "SFERD_RDZV_ENDPOINT": "[fe80::1]:29400",
           "SFERD_RDZV_ID": "x_1.y", "SFERD_MICRO_BATCH": "1", "SFERD_TF32": "true", "SFERD_COMPILE": "1",
           "SFERD_LOADER_WORKERS": "16"}
    assert _settings(tmp_path, env=env) == Runtime(2, 3, "[fe80::1]:29400", "x_1.y", 1, True, True, 16)
    assert _settings(tmp_path, env={"SFERD_TF32": "false", "SFERD_COMPILE": "0"}) == Runtime()


def test_gpu_means_one_process_per_cuda_device(tmp_path):
    import torch

    expected = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    for rt in (_settings(tmp_path, 'nproc_per_node = "gpu"\n'), _settings(tmp_path, env={"SFERD_NPROC_PER_NODE": "gpu"})):
        assert rt.nproc_per_node == "gpu" and rt.procs_per_node() == expected
        assert rt.as_env()["SFERD_NPROC_PER_NODE"] == str(expected)  # the ranks get the resolved count


def test_as_env_reproduces_the_settings(tmp_path):
    rt = Runtime(4, 2, "h:1", "abc", 8, True, False, 2)
    env = rt.as_env()
    assert set(env) == {"SFERD_" + k.upper() for k in SETTINGS}
    assert runtime_settings(tmp_path, env) == rt
    assert "SFERD_MICRO_BATCH" not in Runtime().as_env() and runtime_settings(tmp_path, Runtime().as_env()) == Runtime()


FILE_ERRORS = [
    ("nproc_per_node = 0\n", ':1: nproc_per_node = 0 is not allowed; expected an integer >= 1, or "gpu"'),
    ('nproc_per_node = "cpu"\n', ':1: nproc_per_node = "cpu" is not allowed; expected an integer >= 1, or "gpu"'),
    ("# comment\n\nnnodes = true\n", ":3: nnodes = true is not allowed; expected an integer >= 1"),
    ("nnodes = 2.0\n", ":1: nnodes = 2.0 is not allowed; expected an integer >= 1"),
    ("micro_batch = 0\n", ":1: micro_batch = 0 is not allowed; expected an integer >= 1 (leave unset"),
    ("tf32 = 1\n", ":1: tf32 = 1 is not allowed; expected true or false"),
    ('compile = "yes"\n', ':1: compile = "yes" is not allowed; expected true or false'),
    ("loader_workers = -1\n", ":1: loader_workers = -1 is not allowed; expected an integer >= 0"),
    ('rdzv_endpoint = "node0"\n', ':1: rdzv_endpoint = "node0" is not allowed; expected host:port (port 1-65535)'),
    ('rdzv_endpoint = "node0:70000"\n', ':1: rdzv_endpoint = "node0:70000" is not allowed; expected host:port'),
    ("rdzv_endpoint = 29400\n", ":1: rdzv_endpoint = 29400 is not allowed; expected host:port"),
    ('rdzv_id = "a b"\n', ":1: rdzv_id = \"a b\" is not allowed; expected letters, digits, '.', '_' or '-'"),
    ("tf32 = false\nnprocs = 2\n", ":2: unknown key 'nprocs'; allowed keys: nproc_per_node, nnodes, rdzv_endpoint, "
                                   "rdzv_id, micro_batch, tf32, compile, loader_workers"),
    ("tf32 = false\n[runtime]\nnnodes = 1\n", ":2: unknown key 'runtime'; allowed keys: nproc_per_node"),
    ("nnodes = [1, 2]\n", ":1: nnodes = <list> is not allowed; expected an integer >= 1"),
    ("tf32 = false\nnproc_per_node 2\n", ":2:16: invalid TOML: Expected '=' after a key in a key/value pair"),
    ("nnodes = 2\n", ":1: nnodes = 2 needs rdzv_endpoint (host:port on the first node, the same on every node): set "
                     "SFERD_RDZV_ENDPOINT or rdzv_endpoint in sferd.local.toml"),
]


@pytest.mark.parametrize("text,message", FILE_ERRORS)
def test_file_errors_are_one_line_naming_file_line_key_and_allowed_values(tmp_path, text, message):
    with pytest.raises(RuntimeSettingsError) as e:
        _settings(tmp_path, text)
    assert str(e.value).startswith(str(tmp_path / LOCAL_FILE) + message), str(e.value)
    assert "\n" not in str(e.value)


ENV_ERRORS = [
    ({"SFERD_NPROC_PER_NODE": "0"}, "SFERD_NPROC_PER_NODE='0' is not allowed; expected an integer >= 1, or \"gpu\""),
    ({"SFERD_NPROC_PER_NODE": "2.5"}, "SFERD_NPROC_PER_NODE='2.5' is not allowed"),
    ({"SFERD_NPROC_PER_NODE": "GPU"}, "SFERD_NPROC_PER_NODE='GPU' is not allowed"),
    ({"SFERD_NNODES": "-1"}, "SFERD_NNODES='-1' is not allowed; expected an integer >= 1"),
    ({"SFERD_NNODES": " 2"}, "SFERD_NNODES=' 2' is not allowed"),
    ({"SFERD_MICRO_BATCH": "0"}, "SFERD_MICRO_BATCH='0' is not allowed; expected an integer >= 1"),
    ({"SFERD_TF32": "yes"}, "SFERD_TF32='yes' is not allowed; expected true or false"),
    ({"SFERD_TF32": "True"}, "SFERD_TF32='True' is not allowed; expected true or false"),
    ({"SFERD_COMPILE": "2"}, "SFERD_COMPILE='2' is not allowed; expected true or false"),
    ({"SFERD_LOADER_WORKERS": "many"}, "SFERD_LOADER_WORKERS='many' is not allowed; expected an integer >= 0"),
    ({"SFERD_RDZV_ENDPOINT": "node0:"}, "SFERD_RDZV_ENDPOINT='node0:' is not allowed; expected host:port"),
    ({"SFERD_RDZV_ENDPOINT": "node0:0"}, "SFERD_RDZV_ENDPOINT='node0:0' is not allowed; expected host:port"),
    ({"SFERD_RDZV_ID": "a/b"}, "SFERD_RDZV_ID='a/b' is not allowed; expected letters, digits"),
    ({"SFERD_NNODES": "2"}, "SFERD_NNODES: nnodes = 2 needs rdzv_endpoint"),
]


@pytest.mark.parametrize("env,message", ENV_ERRORS)
def test_environment_errors_are_one_line_naming_variable_and_allowed_values(tmp_path, env, message):
    with pytest.raises(RuntimeSettingsError) as e:
        _settings(tmp_path, env=env)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_a_valid_environment_does_not_hide_a_broken_file(tmp_path):
    with pytest.raises(RuntimeSettingsError, match="tf32 = 3"):
        _settings(tmp_path, "tf32 = 3\n", env={"SFERD_TF32": "1"})


def test_settings_errors_are_stage_errors():
    """A stage that reads the settings itself then fails as one line through the stage runner."""
    assert issubclass(RuntimeSettingsError, StageError)


def test_default_root_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / LOCAL_FILE).write_text("loader_workers = 5\n")
    assert runtime_settings(env={}).loader_workers == 5
    monkeypatch.setenv("SFERD_LOADER_WORKERS", "6")
    assert runtime_settings().loader_workers == 6  # os.environ by default


def test_reading_settings_does_not_import_torch(tmp_path):
    """Even `nproc_per_node = "gpu"` is resolved only when asked (`procs_per_node`)."""
    (tmp_path / LOCAL_FILE).write_text('nproc_per_node = "gpu"\nnnodes = 2\nrdzv_endpoint = "h:1"\n')
    code = ("import sys; from sferd.util.runtime import runtime_settings; rt = runtime_settings(sys.argv[1]); "
            "assert rt.nproc_per_node == 'gpu'; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_local_file_is_ignored_by_git_and_dvc_and_the_example_documents_every_key(tmp_path):
    for ignore in (".gitignore", ".dvcignore"):
        assert "/sferd.local.toml" in (ROOT / ignore).read_text().splitlines(), ignore
    example = (ROOT / "sferd.local.toml.example").read_text()
    for key in SETTINGS:
        assert f"{key} =" in example, key  # each key shown (commented out where it has no default value)
    # the example as shipped is valid and changes nothing
    assert _settings(tmp_path, example) == Runtime()
    # and its commented-out lines are valid values too
    uncommented = "\n".join(line[2:] if line.split(" = ")[0][2:] in SETTINGS else line for line in example.splitlines())
    assert _settings(tmp_path, uncommented) == Runtime(rdzv_endpoint="node0:29400", micro_batch=64)
