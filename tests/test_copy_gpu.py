"""`infermeter copy` on a real GPU: every method, layout, host memory and direction moves the right
bytes. Run on a CUDA machine with `python -m pytest -m gpu tests/test_copy_gpu.py`."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from infermeter.copy import methods as cm  # noqa: E402
from infermeter.copy.cases import METHODS, plan_layout  # noqa: E402
from infermeter.copy.chunks import plan_chunks  # noqa: E402
from infermeter.copy.host import alloc_host  # noqa: E402
from infermeter.copy.job import CopyRequest, run_copy  # noqa: E402
from infermeter.copy.verify import CopyMismatch, verify_layout  # noqa: E402
from infermeter.measure.mapped_host import mapped_view  # noqa: E402
from infermeter.specs.presets import PRESETS  # noqa: E402


def _request(model, batch, seq_len, blocks, **kw):
    return CopyRequest(PRESETS[model], (batch,), (seq_len,), kv_dtype=kw.pop("kv_dtype", "bf16"),
                       block_tokens=blocks, repeats=2, warmup=1, **kw)


@pytest.mark.parametrize("model,batch,seq_len,blocks", [
    ("llama-2-7b", 1, 64, (16, 5)),       # 32 MiB: many staged chunks, ring buffers reused
    ("gemma-2-9b", 2, 37, (16,)),         # sliding-window layers, partial last blocks
    ("debug", 3, 11, (1, 4)),             # tiny pieces, fp32
])
def test_every_case_moves_the_right_bytes(model, batch, seq_len, blocks):
    (result,) = run_copy(_request(model, batch, seq_len, blocks))
    cases = result.metrics["cases"]
    skipped = result.metrics["skipped"]
    # Every case either ran and was verified (a mismatch raises) or says why it was skipped.
    n_variants = 2 + len(blocks)
    assert len(cases) + len(skipped) == n_variants * 3 * 3 * len(METHODS)
    assert all(c["verified"]["bytes"] == c["bytes_moved"] for c in cases)
    ran = {(c["host_memory"], c["method"]) for c in cases}
    for method in ("per-tensor", "staged", "streams"):
        assert ("pinned", method) in ran and ("pageable", method) in ran
    assert ("seed", "per-tensor") in ran
    for c in cases:
        assert c["bytes"] == result.metrics["kv_cache_bytes"]
        assert c["gbps"] > 0 and c["moving_time_ms"] > 0
        if c["host_memory"] == "pinned":
            assert c["host_pinned"] is True and c["timing"] == "cuda-events+hold"
    mapped_skips = [s["reason"] for s in skipped if s["method"] == "mapped"
                    and s["host_memory"] == "pinned"]
    print("mapped skipped:", mapped_skips[:1])


def test_mapped_view_aliases_pinned_memory():
    host, notes = alloc_host(1 << 20, 8, pinned=True)
    assert not notes and host.is_pinned()
    view, how = mapped_view(host, torch.device("cuda"))
    if view is None:
        pytest.skip(f"no device mapping here: {how}")
    view.copy_(torch.arange(view.numel(), device="cuda", dtype=view.dtype))
    torch.cuda.synchronize()
    assert torch.equal(host, torch.arange(host.numel(), dtype=host.dtype))


@pytest.mark.parametrize("layout_kind", ["contiguous", "engine"])
def test_mapped_method_runs_kernels_not_memcpy(layout_kind):
    from torch.profiler import ProfilerActivity, profile

    plan = plan_layout(PRESETS["llama-2-7b"], 1, 64, "fp16", layout_kind)
    layout = cm.DeviceLayout(plan, torch.device("cuda"), torch.float16)
    layout.fill_random(3)
    host, _ = alloc_host(plan.total_bytes, plan.word_bytes(), pinned=True)
    view, how = mapped_view(host, torch.device("cuda"))
    if view is None:
        pytest.skip(f"no device mapping here: {how}")
    mover = cm.Mapped(layout, view, plan_chunks(plan, plan.total_bytes, plan.total_bytes),
                      "d2h")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mover.enqueue(None)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert names and not [n for n in names if "Memcpy" in n or "memcpy" in n]
    verify_layout(layout, host, "mapped d2h")


def test_verification_catches_one_corrupted_byte_on_the_gpu():
    plan = plan_layout(PRESETS["llama-2-7b"], 1, 16, "fp16", "paged", 16)
    layout = cm.DeviceLayout(plan, torch.device("cuda"), torch.float16)
    layout.fill_random(7)
    host, _ = alloc_host(plan.total_bytes, plan.word_bytes(), pinned=True)
    mover = cm.Staged(layout, host, plan_chunks(plan, 2**16, 2**18), "d2h")
    mover.enqueue(None if mover.streams[0] is None else _started())
    torch.cuda.synchronize()
    verify_layout(layout, host, "good copy")
    host.view(torch.uint8)[12345] ^= 0xFF
    with pytest.raises(CopyMismatch, match="host byte 12,34"):
        verify_layout(layout, host, "corrupted copy")


def _started():
    event = torch.cuda.Event()
    event.record()
    return event


def test_cli_json_on_the_gpu(tmp_path):
    path = tmp_path / "copy.jsonl"
    out = subprocess.run([sys.executable, "-m", "infermeter", "copy", "--seq-len", "128",
                          "--repeats", "3", "--json", "--output", str(path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (result,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert result["kind"] == "copy" and result["config"]["device"] == "cuda"
    metrics = result["metrics"]
    assert metrics["kv_cache_bytes"] == 67_108_864
    for key in ("link_peak_gbps", "numa_node", "offload_ms", "reload_ms", "diagnosis", "targets"):
        assert key in metrics
    assert metrics["offload_ms"] > 0 and metrics["diagnosis"]
    assert len(path.read_text().splitlines()) == 1
