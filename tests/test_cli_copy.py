"""`infermeter copy` end to end (main(argv) in this process with its output captured,
tests/cli_in_process.py): without a GPU (sizes only), the host-memcpy run (--device cpu), and
bad input."""

import json

import pytest
import torch

from infermeter.specs import sizes
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli as in_process


def run_cli(*args):
    return in_process("copy", *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_prints_sizes_and_exits_0():
    out = run_cli()
    assert out.returncode == 0, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in out.stderr
    assert "268,435,456" in out.stdout and "2,048" in out.stdout and "128.0 KiB" in out.stdout
    assert "69 cases would be timed" in out.stdout
    out = run_cli("--json")  # it exited 0 with no JSON line: now the one error line
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["infermeter: error: no CUDA GPU found, so nothing to "
                                       "measure for --json (--device cpu runs a host-memcpy "
                                       "version)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_device_cuda_named_without_a_gpu_is_an_error(tmp_path):
    """Asked for by name, a missing GPU is an error (exit 2, one line), as in generate; only
    the default device falls back to showing what would move."""
    out = run_cli("--device", "cuda", "--output", str(tmp_path / "copy.jsonl"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["infermeter: error: --device cuda asked for, but no CUDA "
                                       "GPU is visible (--device cpu runs a host-memcpy version)"]
    assert not (tmp_path / "copy.jsonl").exists()


def test_cli_device_cpu_writes_a_copy_result(tmp_path):
    path = tmp_path / "copy.jsonl"
    out = run_cli("--device", "cpu", "--model", "llama-3.2-1b", "--seq-len", "16",
                  "--batch-size", "2", "--block-tokens", "4", "--repeats", "3", "--json",
                  "--output", str(path))
    assert out.returncode == 0, out.stderr
    (result,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert json.loads(path.read_text()) == result
    assert result["schema"] == 1 and result["kind"] == "copy"
    assert result["config"]["device"] == "cpu" and result["config"]["batch_size"] == 2
    m = result["metrics"]
    assert m["kv_cache_bytes"] == sizes.kv_cache_bytes(PRESETS["llama-3.2-1b"], 2, 16, "bf16")
    cases = m["cases"]
    assert {c["layout"] for c in cases} == {"engine", "contiguous", "paged"}
    assert {c["host_memory"] for c in cases} == {"seed", "pageable"}
    for c in cases:
        for key in ("layout", "host_memory", "direction", "method", "bytes", "moving_time_ms",
                    "gbps", "link_pct", "block_tokens", "stats"):
            assert key in c
        assert c["bytes"] == m["kv_cache_bytes"]
        check = "pieces" if c["host_memory"] == "seed" else "bytes"
        assert c["verified"] == {"check": check, "bytes": c["bytes_moved"]}
        assert len(result["samples"][next(iter(result["samples"]))]) == 3
    for key in ("link_peak_gbps", "numa_node", "offload_ms", "reload_ms", "diagnosis",
                "skipped", "targets"):
        assert key in m
    assert m["offload_ms"] > 0 and any("pinned memory needs CUDA" in s["reason"]
                                       for s in m["skipped"])


def test_cli_device_cpu_table():
    out = run_cli("--device", "cpu", "--model", "debug", "--seq-len", "8", "--repeats", "2",
                  "--layout", "engine", "--direction", "d2h")
    assert out.returncode == 0, out.stderr
    assert "GB/s" in out.stdout and "engine" in out.stdout and "per-tensor" in out.stdout


@pytest.mark.parametrize("args,message", [
    (("--layout", "ring"), "invalid choice"),
    (("--kv-dtype", "fp12"), "unknown dtype"),
    (("--block-tokens", "0"), "must be a positive integer"),
    (("--host", "gpu"), "invalid choice"),
    (("--model", "no-such-model"), "no-such-model"),
    (("--device", "cpu", "--warmup", "-1"), "--warmup"),
    # every case skipped: exit 0 and a Result with no case in it
    (("--device", "cpu", "--model", "debug", "--method", "mapped"),
     "none of the cases these flags name can run on cpu (the seed way is one .cpu()/.cuda() "
     "per tensor: per-tensor only; mapped needs CUDA; pinned memory needs CUDA): nothing to "
     "time"),
    (("--device", "cpu", "--model", "debug", "--host", "pinned"), "pinned memory needs CUDA"),
])
def test_cli_bad_input_is_one_error_line(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("infermeter")


def test_a_tp_the_heads_refuse_fails_before_torchrun_starts(monkeypatch):
    def relaunch(*args, **kwargs):
        raise AssertionError("torchrun started for a --tp the model cannot split")

    monkeypatch.setattr("infermeter.launch.relaunch_if_needed", relaunch)
    out = run_cli("--device", "cpu", "--model", "debug", "--tp", "3")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "infermeter: error: tp=3 does not divide debug's 4 attention heads"]
