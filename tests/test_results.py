"""Result schema, atomic JSON/JSONL writing, reading back, and environment capture."""

import json
import os

import pytest

from infermeter.errors import InfermeterError
from infermeter.measure.env import SETTING_PREFIXES, capture_env, nvml_facts
from infermeter.measure.result import (
    REQUIRED_FIELDS,
    Result,
    append_jsonl,
    read_results,
    write_json,
)

ENV_FIELDS = ("device_name", "device_count", "driver", "cuda", "torch", "pcie_gen",
              "pcie_width", "host_cpu", "hostname", "timestamp", "infermeter_version",
              "source_revision", "settings")


def make(kind="kv", n=1):
    return Result(kind, {"name": "debug"}, {"batch_size": n}, {"hostname": "h"},
                  {"kv_cache_bytes": 100 * n}, samples={"x": [1, 2]}, warnings=["w"])


def test_schema_fields():
    data = make().to_dict()
    assert all(name in data for name in REQUIRED_FIELDS)
    assert data["schema"] == 1 and "output_token_ids" not in data
    with_ids = Result("generate", {}, {}, {}, {}, output_token_ids=[[1, 2]]).to_dict()
    assert with_ids["output_token_ids"] == [[1, 2]]
    with pytest.raises(ValueError):
        Result("speed", {}, {}, {}, {})


def test_jsonl_append_round_trip(tmp_path):
    path = tmp_path / "out.jsonl"
    append_jsonl(path, [make(n=1)])
    append_jsonl(path, [make(n=2), make(n=3)])
    back = read_results(path)
    assert [r.config["batch_size"] for r in back] == [1, 2, 3]
    assert back[0] == make(n=1)
    assert len(path.read_text().splitlines()) == 3


def test_append_repairs_a_missing_final_newline(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(make(n=1).to_json())  # written by hand, no trailing newline
    append_jsonl(path, [make(n=2)])
    assert [r.config["batch_size"] for r in read_results(path)] == [1, 2]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    append_jsonl(path, [make(n=1)])
    before = path.read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(InfermeterError, match="cannot write it .disk full"):
        append_jsonl(path, [make(n=2)])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_nan_is_refused_before_anything_is_written(tmp_path):
    bad = Result("kv", {}, {}, {}, {"x": float("nan")})
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "out.jsonl", [bad])
    assert not (tmp_path / "out.jsonl").exists()


def test_write_and_read_single_json(tmp_path):
    path = tmp_path / "one.json"
    write_json(path, make())
    assert read_results(path) == [make()]
    path.write_text(json.dumps([make().to_dict(), make(n=2).to_dict()]))
    assert len(read_results(path)) == 2


@pytest.mark.parametrize("content, message", [
    ('{"schema": 1}\n{broken\n', r"out.jsonl:1: not an infermeter Result"),
    (make().to_json() + "\n{broken\n", r"out.jsonl:2: not valid JSON"),
    ('{"schema": 9, "kind": "kv", "model": {}, "config": {}, "env": {}, "metrics": {},'
     ' "samples": {}, "warnings": []}', "schema 9 is not supported"),
    ("[1]", "expected a JSON object"),
])
def test_bad_result_files(tmp_path, content, message):
    path = tmp_path / "out.jsonl"
    path.write_text(content)
    with pytest.raises(InfermeterError, match=message):
        read_results(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InfermeterError, match="no such file"):
        read_results(tmp_path / "nope.jsonl")
    with pytest.raises(InfermeterError, match="does not exist"):
        append_jsonl(tmp_path / "no" / "dir" / "out.jsonl", [make()])


def test_env_capture_without_gpu():
    env = capture_env()
    assert all(name in env for name in ENV_FIELDS)
    json.dumps(env)  # JSON-ready
    assert env["host_cpu"] and env["timestamp"].endswith("+00:00")


def test_env_keeps_the_settings_that_change_how_torch_runs_and_nothing_else(monkeypatch):
    """env.settings: the allocator's, compiler's, Triton's, CUDA's and NCCL's variables that are
    set, by name; an unrelated variable (a token, a path) is not a setting."""
    for name in [n for n in os.environ if n.startswith(SETTING_PREFIXES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/own")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setenv("TORCHVISION_THING", "x")  # TORCH without the underscore: not ours
    assert capture_env()["settings"] == {
        "NCCL_NVLS_ENABLE": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/own"}


def test_source_revision_names_the_commit_and_a_changed_tree(tmp_path, monkeypatch):
    """env's source_revision: HEAD of the checkout the package runs from, "+dirty" once one of
    the package's tracked files differs from it (untracked files and tracked files outside the
    package, such as results, do not count), None outside any checkout or where the package is
    not tracked; the environment's value where one is given."""
    monkeypatch.delenv("INFERMETER_SOURCE_REVISION", raising=False)
    import subprocess

    from infermeter.measure.env import source_revision

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, text=True,
                              capture_output=True).stdout.strip()

    package = tmp_path / "pkg"
    package.mkdir()
    assert source_revision(package) is None  # not a checkout (tmp_path is outside the repo)
    git("init", "-q")
    (package / "__init__.py").write_text("x = 1\n")
    (tmp_path / "results.jsonl").write_text("{}\n")
    assert source_revision(package) is None  # a checkout, but the package is not tracked in it
    git("add", "pkg/__init__.py", "results.jsonl")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    (package / "notes.txt").write_text("untracked\n")
    (tmp_path / "results.jsonl").write_text("{}\n{}\n")  # a sweep appending: not the code
    assert source_revision(package) == head
    (package / "__init__.py").write_text("x = 2\n")
    assert source_revision(package) == head + "+dirty"
    monkeypatch.setenv("INFERMETER_SOURCE_REVISION", "abc123")  # a copy without .git
    assert source_revision(package) == "abc123"


def test_nvml_absent_or_failing_gives_empty(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert nvml_facts() == {}


def test_result_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        append_jsonl(tmp_path / "out.jsonl", [make()])
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o644


def test_device_slug_names_result_files():
    from infermeter.measure.env import device_slug

    assert device_slug({"device_name": "NVIDIA H200"}) == "nvidia-h200"
    assert device_slug({"device_name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
