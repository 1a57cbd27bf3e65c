"""`infermeter kv` and `infermeter presets` end to end: main(argv) in this process with its
output captured (tests/cli_in_process.py), and `python -m infermeter` once, in a subprocess."""

import json
import subprocess
import sys

import pytest

from tests import published_configs as published
from tests.cli_in_process import run_cli


def run(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def test_default_run_is_the_seed_case():
    out = run("kv")
    assert out.returncode == 0, out.stderr
    assert "268,435,456" in out.stdout and "256.0 MiB" in out.stdout
    assert "llama-2-7b" in out.stdout


def test_json_result_schema():
    out = run("kv", "--model", "llama-2-13b", "--tp", "2", "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    assert result["schema"] == 1 and result["kind"] == "kv"
    for key in ("kv_bytes_per_token", "kv_cache_bytes", "kv_cache_bytes_per_rank",
                "weight_bytes"):
        assert key in result["metrics"]
    assert result["metrics"]["kv_cache_bytes_per_rank"] == 209_715_200
    assert result["model"]["n_kv_heads"] == 40 and result["config"]["tp"] == 2
    for key in ("device_name", "device_count", "driver", "cuda", "torch", "pcie_gen",
                "pcie_width", "host_cpu", "hostname", "timestamp", "infermeter_version"):
        assert key in result["env"]


def test_sweep_gives_one_result_per_case_and_appends(tmp_path):
    path = tmp_path / "kv.jsonl"
    args = ("kv", "--model", "llama-3-8b", "--batch-size", "1", "8", "--seq-len", "512", "8192",
            "--kv-dtype", "fp8", "--gpu-memory", "80GiB", "--output", str(path))
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") >= 6  # header lines + 4 rows
    run(*args, "--json")
    lines = json_lines(path.read_text())
    assert len(lines) == 8  # two runs of 4 cases, the first run's lines intact
    cases = {(r["config"]["batch_size"], r["config"]["seq_len"]) for r in lines}
    assert cases == {(1, 512), (1, 8192), (8, 512), (8, 8192)}
    big = next(r for r in lines if r["config"]["batch_size"] == 8
               and r["config"]["seq_len"] == 8192)
    assert big["metrics"]["kv_cache_bytes"] == 8 * 8192 * 2 * 32 * 8 * 128 * 1
    assert big["metrics"]["fits"] is True and big["metrics"]["max_batch_size"] > 8


def test_fit_reports_what_does_not_fit():
    out = run("kv", "--model", "llama-2-70b", "--gpu-memory", "80GiB", "--json")
    (result,) = json_lines(out.stdout)
    assert result["metrics"]["fits"] is False and result["metrics"]["max_batch_size"] == 0
    assert any("exceed the GPU memory" in w for w in result["warnings"])


def test_reserve_as_size():
    out = run("kv", "--gpu-memory", "24GiB", "--reserve", "2GiB", "--json")
    (result,) = json_lines(out.stdout)
    m = result["metrics"]
    assert m["activation_reserve_bytes"] == 2 * 2**30
    assert m["kv_budget_bytes"] == 24 * 2**30 - 2 * 2**30 - m["weight_bytes"]


def test_model_from_a_config_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(published.MIXTRAL_8X7B))
    out = run("kv", "--model", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    assert result["model"]["n_experts"] == 8
    assert result["metrics"]["weight_bytes_active"] < result["metrics"]["weight_bytes"]


def test_meta_70b_params_json_alone_sizes_the_cache(tmp_path):
    """Meta's 70B params.json says vocab_size -1 and no tokenizer sits beside it: the cache is
    sized (it does not depend on the vocabulary), the weights are unknown, with a warning."""
    folder = tmp_path / "Llama-2-70b"
    folder.mkdir()
    params = folder / "params.json"
    params.write_text(json.dumps(published.META_LLAMA2_70B))
    out = run("kv", "--model", str(params), "--seq-len", "4096", "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    per_token = 2 * 80 * 8 * 128 * 2  # K and V, 80 layers, 8 KV heads of 128, bf16
    assert result["metrics"]["kv_bytes_per_token"] == per_token
    assert result["metrics"]["kv_cache_bytes"] == 4096 * per_token
    assert result["model"]["vocab_size"] is None
    for key in ("param_count", "weight_bytes", "weight_bytes_per_rank"):
        assert result["metrics"][key] is None
    assert any("vocabulary size is unknown" in w for w in result["warnings"])
    table = run("kv", "--model", str(params), "--gpu-memory", "80GiB")
    assert table.returncode == 0, table.stderr
    assert "weights unknown" in table.stdout and "320.0 KiB" in table.stdout
    assert "warning: the vocabulary size is unknown" in table.stdout
    assert "warning: no KV budget" in table.stdout
    assert "give --gpu-memory" not in run("kv", "--model", str(params)).stdout  # no use here


def test_weights_default_to_their_published_dtype():
    """DeepSeek-V3 is published in FP8 (computing and caching in bf16); --dtype still rules."""
    (fp8,) = json_lines(run("kv", "--model", "deepseek-v3", "--json").stdout)
    assert fp8["config"]["dtype"] == "float8" and fp8["config"]["kv_dtype"] == "bfloat16"
    assert fp8["metrics"]["weight_bytes"] == fp8["metrics"]["param_count"]  # one byte each
    assert 620 * 2**30 < fp8["metrics"]["weight_bytes"] < 630 * 2**30
    assert fp8["metrics"]["kv_bytes_per_token"] == 61 * (512 + 64) * 2
    (bf16,) = json_lines(run("kv", "--model", "deepseek-v3", "--dtype", "bf16", "--json").stdout)
    assert bf16["metrics"]["weight_bytes"] == 2 * fp8["metrics"]["weight_bytes"]
    (llama,) = json_lines(run("kv", "--model", "llama-3-8b", "--json").stdout)
    assert llama["config"]["dtype"] == "bfloat16"


def test_a_sliding_window_is_said_where_it_caps_the_cache():
    out = run("kv", "--model", "mistral-7b", "--seq-len", "32768")
    assert out.returncode == 0, out.stderr
    assert "128.0 KiB" in out.stdout and "512.0 MiB" in out.stdout  # 4096 tokens, not 32768
    assert ("sliding window 4096 tokens on every layer: the cache holds at most 4096 tokens a "
            "sequence") in out.stdout
    gemma = run("kv", "--model", "gemma-2-9b").stdout
    assert "sliding window 4096 tokens on 21 of 42 layers" in gemma
    assert "sliding window" not in run("kv", "--model", "llama-3-8b").stdout
    presets = {line.split()[0]: line for line in run("presets").stdout.splitlines()[2:]}
    assert presets["mistral-7b"].endswith("4096 tokens, every layer")
    assert presets["gemma-2-9b"].endswith("4096 tokens, 21 of 42 layers")
    assert presets["llama-3-8b"].endswith(" -")
    assert "624.9 GiB  float8" in presets["deepseek-v3"]


def test_presets_lists_every_preset():
    out = run("presets")
    assert out.returncode == 0
    for name in ("llama-2-7b", "deepseek-v3", "gemma-2-9b", "debug"):
        assert name in out.stdout
    assert "deepseek-v3" in json.loads(run("presets", "--json").stdout)


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "infermeter", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("infermeter ")


@pytest.mark.parametrize("args, message", [
    (("kv", "--model", "llama-3.1-8"), "did you mean"),
    (("kv", "--model", "/no/such/config.json"), "no such file"),
    (("kv", "--tp", "3"), "does not divide"),
    (("kv", "--batch-size", "0"), "must be a positive integer"),
    (("kv", "--seq-len", "-4"), "seq-len"),
    (("kv", "--kv-dtype", "fp4"), "unknown dtype"),
    (("kv", "--gpu-memory", "lots"), "cannot read size"),
    (("kv", "--gpu-memory", "80GiB", "--reserve", "120%"), "at least 0% and below 100%"),
    (("kv", "--frobnicate"), "unrecognized arguments"),
    (("nonsense",), "invalid choice"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("content, message", [
    ("{oops", "not valid JSON"),
    (json.dumps({"model_type": "bert", "hidden_size": 8}), "unsupported model_type 'bert'"),
])
def test_bad_config_file_on_the_cli(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    out = run("kv", "--model", str(path), "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()  # no half-written result


@pytest.mark.parametrize("args, message", [
    # read only when a GPU memory was known: passed on a machine without one
    (("--reserve", "150%"), "reserve '150%' must be at least 0% and below 100%"),
    (("--reserve", "lots"), "cannot read size 'lots'"),
    # printed "experts mxfp4" for a model without experts
    (("--expert-dtype", "mxfp4"), "--expert-dtype applies to the experts of a MoE model; "
     "llama-2-7b has none"),
])
def test_bad_sizing_flags_are_one_error_line(args, message, tmp_path):
    out = run("kv", *args, "--output", str(tmp_path / "kv.jsonl"))
    assert out.returncode == 2, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], out.stderr
    assert out.stdout == "" and not (tmp_path / "kv.jsonl").exists()


def test_an_output_folder_is_the_same_error_as_the_measuring_commands(tmp_path):
    out = run("kv", "--output", str(tmp_path))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"infermeter: error: {tmp_path}: a folder; --output names a JSONL file"]
