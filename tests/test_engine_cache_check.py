"""The engine's cache allocation (built on the meta device) equals the analytic size."""

import pytest

from infermeter.errors import InfermeterError
from infermeter.kv.cache_check import allocated_cache_bytes
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import kv_cache_bytes


@pytest.mark.parametrize("name, batch, seq_len, kv_dtype", [
    ("llama-2-7b", 1, 512, "fp16"),        # the seed case: 268,435,456 bytes
    ("llama-3.1-70b", 8, 4096, "bf16"),    # GQA
    ("mistral-7b", 2, 10_000, "bf16"),     # every layer capped at its 4096-token window
    ("qwen2.5-0.5b", 3, 777, "fp32"),
])
def test_engine_allocates_the_computed_bytes(name, batch, seq_len, kv_dtype):
    spec = PRESETS[name]
    assert allocated_cache_bytes(spec, batch, seq_len, kv_dtype) == kv_cache_bytes(
        spec, batch, seq_len, kv_dtype)


def test_sizing_only_models_and_dtypes_are_refused():
    with pytest.raises(InfermeterError, match="can be sized but not run"):
        allocated_cache_bytes(PRESETS["deepseek-v3"], 1, 16, "bf16")
    with pytest.raises(InfermeterError, match="not supported by the engine"):
        allocated_cache_bytes(PRESETS["llama-2-7b"], 1, 16, "fp8")


def test_kv_cli_reports_the_allocation():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "infermeter", "kv", "--check-engine", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["kv_cache_bytes_allocated"] == metrics["kv_cache_bytes"] == 268_435_456
