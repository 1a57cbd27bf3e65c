"""Roofline arithmetic against hand-computed values, and the CPU run of the peak measurements.

Hand computations (the published shapes, specs/presets.py):
  Llama-2-7B: 6,738,415,616 parameters; embedding table 32,000 x 4,096 = 131,072,000 (untied);
  norms (2 x 32 + 1) x 4,096 = 266,240; KV per token 2 x 32 layers x 32 heads x 128 x 2 bytes
  = 524,288 bytes (fp16).
"""

from __future__ import annotations

import pytest
import torch

from infermeter.measure import roofline as rl
from infermeter.specs.presets import PRESETS

LLAMA2 = PRESETS["llama-2-7b"]


def test_decode_bytes_llama2_7b_batch1_512():
    # Weights: all but the embedding table, plus the one row gathered: 6,607,347,712 params.
    assert rl.decode_weight_params(LLAMA2, 1) == 6_738_415_616 - 131_072_000 + 4_096
    assert rl.decode_weight_bytes(LLAMA2, "fp16", 1) == 13_214_695_424
    assert rl.decode_kv_bytes(LLAMA2, 1, 512, "fp16") == 512 * 524_288 == 268_435_456
    assert rl.decode_step_bytes(LLAMA2, 1, 512, "fp16", "fp16") == 13_483_130_880


def test_decode_bytes_gqa_llama31_8b():
    spec = PRESETS["llama-3.1-8b"]  # 8 KV heads of 32: 2 x 32 x 8 x 128 x 2 = 131,072 B/token
    assert rl.decode_kv_bytes(spec, 4, 4096, "bf16") == 4 * 4096 * 131_072 == 2_147_483_648
    # 8,030,261,248 - 128,256 x 4,096 (525,336,576) + 4 rows of 4,096, in bf16.
    assert rl.decode_weight_bytes(spec, "bf16", 4) == 2 * 7_504_941_056


def test_tied_embeddings_are_read_whole():
    spec = PRESETS["llama-3.2-1b"]  # the output head reads the shared table every step
    assert rl.decode_weight_params(spec, 1) == 1_235_814_400


def test_kv_read_is_capped_by_the_sliding_window():
    mistral = PRESETS["mistral-7b"]  # window 4096 on every layer, 8 KV heads: 131,072 B/token
    assert rl.decode_kv_bytes(mistral, 1, 8192, "fp16") == 4096 * 131_072
    assert rl.decode_kv_bytes(mistral, 1, 1000, "fp16") == 1000 * 131_072
    # One windowed layer of two: layer 0 reads 32 tokens, layer 1 all 100; fp32, 2 KV heads of
    # 16: 2 x 2 x 16 x 4 = 256 bytes per token and layer.
    spec = PRESETS["debug"].with_updates(sliding_window=32, sliding_window_layers=(0,))
    assert rl.decode_kv_bytes(spec, 1, 100, "fp32") == (32 + 100) * 256
    assert rl.mean_decode_step_bytes(spec, 1, [10, 20], "fp32", "fp32") == \
        rl.decode_weight_bytes(spec, "fp32", 1) + 15 * 2 * 256


def test_moe_reads_active_experts_at_batch1_and_more_with_the_batch():
    spec = PRESETS["mixtral-8x7b"]
    # Active parameters: per layer attention 41,943,040 + 2 experts 352,321,536 + router 32,768
    # + norms 8,192 = 394,305,536; x 32 + embeddings 262,144,000 + final norm = 12,879,925,248.
    assert rl.decode_weight_params(spec, 1) == 12_879_925_248 - 131_072_000 + 4_096
    # Two tokens use 8 x (1 - (6/8)^2) = 3.5 experts on average: 1.5 more per layer.
    assert rl.expected_experts(spec, 2) == pytest.approx(3.5)
    extra = 1.5 * 3 * 4096 * 14336 * 32 + 4096
    assert rl.decode_weight_params(spec, 2) == pytest.approx(12_748_857_344 + extra)
    # A large batch touches every expert.
    assert rl.decode_weight_params(spec, 1024) == pytest.approx(
        46_702_792_704 - 131_072_000 + 1024 * 4096)


def test_prefill_flops_llama2_7b_2048():
    assert rl.matmul_params(LLAMA2) == 6_738_415_616 - 266_240 - 131_072_000
    assert rl.head_params(LLAMA2) == 32_000 * 4096 == 131_072_000
    # The layers' products for all 2048 tokens, the output head (32,000 x 4096) for the one row
    # a sequence samples: counting it for every token would add 2 x 131,072,000 x 2047 FLOPs.
    dense = 2 * ((6_607_077_376 - 131_072_000) * 2048 + 131_072_000)
    # QK^T and PV: 2 x (128 + 128) FLOPs per visible pair, 32 heads, 32 layers, 2048 x 2049 / 2.
    attention = 2 * 256 * 32 * 32 * (2048 * 2049 // 2)
    assert rl.attention_flops(LLAMA2, 1, 2048) == attention == 1_100_048_498_688
    assert rl.prefill_flops(LLAMA2, 1, 2048) == dense + attention == 27_626_028_662_784
    assert rl.prefill_flops(LLAMA2, 3, 2048) == 3 * (dense + attention)
    # one token: the whole model once, head included
    assert rl.prefill_flops(LLAMA2, 1, 1) == 2 * 6_607_077_376 + 2 * 256 * 32 * 32


def test_the_output_head_counts_once_per_sequence():
    """Twice the prompt doubles the layers' product FLOPs but not the head's: T x the layers +
    one head row, per sequence (a tied head, Llama-3.2-1B, too)."""
    for spec in (LLAMA2, PRESETS["llama-3.2-1b"]):
        head, body = rl.head_params(spec), rl.matmul_params(spec) - rl.head_params(spec)
        dense = {(b, t): rl.prefill_flops(spec, b, t) - rl.attention_flops(spec, b, t)
                 for b, t in ((1, 1000), (1, 2000))}
        assert dense[1, 1000] == 2 * (1000 * body + head)
        assert dense[1, 2000] - dense[1, 1000] == 2 * 1000 * body


def test_causal_pairs_with_and_without_a_window():
    assert rl.causal_pairs(4) == 1 + 2 + 3 + 4
    assert rl.causal_pairs(4, window=2) == 1 + 2 + 2 + 2
    assert rl.causal_pairs(4, window=8) == 10


def test_utilisation_and_the_plausibility_flag():
    gbps = rl.achieved_gbps(13_483_130_880, 5.0)  # bytes per step at a 5 ms TPOT
    assert gbps == pytest.approx(2696.626176)
    assert rl.pct(gbps, 3000.0) == pytest.approx(89.88754, rel=1e-6)
    assert rl.pct(None, 3000.0) is None and rl.pct(1.0, None) is None
    assert rl.roofline_warnings(89.9, 55.0) == []
    notes = rl.roofline_warnings(130.0, 101.0)
    assert len(notes) == 2 and all("measurement error" in n for n in notes)


def test_measure_roofline_on_the_cpu():
    peaks = rl.measure_roofline(torch.device("cpu"), repeats=3, copy_bytes=1 << 20, matmul_n=64)
    assert peaks.hbm_gbps > 0 and peaks.matmul_tflops > 0
    assert len(peaks.samples["hbm_copy_ms"]) == len(peaks.samples["matmul_ms"]) == 3
    metrics = peaks.metrics()
    assert metrics["roofline_copy_bytes"] == 1 << 20 and metrics["roofline_matmul_dtype"] == \
        "float32"
    assert any("only 3 samples" in w for w in peaks.warnings)
    # a CPU has no HBM: its warnings name the memory copy it timed
    assert any(w.startswith("roofline memory copy: only 3 samples") for w in peaks.warnings)
    assert not any("HBM" in w for w in peaks.warnings)


def test_a_gpu_is_measured_once_a_process_and_later_cases_say_they_reused_it(monkeypatch):
    """On a GPU the first measurement is kept (a copy's figure moved with where its buffers
    landed after a large model was freed: the module docstring): later calls with the same
    arguments get it, marked roofline_reused, measuring nothing; other arguments or another
    device measure anew; a CPU measures every time. The kept copy is not the caller's."""
    monkeypatch.setattr(rl, "_MEASURED", {})
    calls = []

    def fake(device, repeats, copy_bytes, matmul_n):
        calls.append(str(device))
        return rl.Roofline(str(device), hbm_gbps=3000.0 - len(calls), matmul_tflops=700.0,
                           samples={"hbm_copy_ms": [0.7]})

    monkeypatch.setattr(rl, "_measure_roofline", fake)
    gpu = torch.device("cuda:0")
    first = rl.measure_roofline(gpu)
    assert first.hbm_gbps == 2999.0 and first.metrics()["roofline_reused"] is False
    first.samples["hbm_copy_ms"].append(9.9)  # the caller's object, not the kept one
    again = rl.measure_roofline(gpu)
    assert calls == ["cuda:0"]
    assert again.hbm_gbps == 2999.0 and again.metrics()["roofline_reused"] is True
    assert again.samples == {"hbm_copy_ms": [0.7]}
    assert rl.measure_roofline(gpu, repeats=3).hbm_gbps == 2998.0  # other arguments
    assert rl.measure_roofline(torch.device("cuda:1")).hbm_gbps == 2997.0
    cpu = torch.device("cpu")
    assert rl.measure_roofline(cpu).hbm_gbps == 2996.0
    assert rl.measure_roofline(cpu).hbm_gbps == 2995.0  # a CPU: every time
    assert calls == ["cuda:0", "cuda:0", "cuda:1", "cpu", "cpu"]

def test_measured_peaks_from_a_fake_clock(monkeypatch):
    """Every timed call takes 2^-9 s on the fake clock: the copy of 1 MiB moves 2 MiB (read +
    write) in 1.953125 ms = 2^30 / 1e9 GB/s; the 64^3 matmul does 2 x 64^3 = 2^19 FLOPs in it."""
    from infermeter.measure import timing

    ticks = iter(range(10_000))
    monkeypatch.setattr(rl, "time_host", lambda fn, repeats, warmup: timing.time_host(
        fn, repeats, warmup, clock=lambda: next(ticks) / 512))
    peaks = rl.measure_roofline(torch.device("cpu"), repeats=3, copy_bytes=1 << 20, matmul_n=64)
    assert peaks.samples["hbm_copy_ms"] == [1.953125] * 3
    assert peaks.hbm_gbps == pytest.approx(2**30 / 1e9, rel=1e-12)
    assert peaks.matmul_tflops == pytest.approx(2**28 / 1e12, rel=1e-12)


def test_mbu_and_mfu_of_a_run_exactly():
    """Llama-2-7B fp16, batch 1, a 2048-token prompt, one decode step at context 2049:
    13,214,695,424 weight bytes + 2049 x 524,288 KV bytes = 14,288,961,536 bytes in a 4 ms TPOT
    = 3572.240384 GB/s, half the 7144.480768 GB/s peak (MBU 50%, 500 tokens/s at the roofline);
    27,626,028,662,784 prefill FLOPs in a 1000 ms median TTFT = 27.63 TFLOP/s, a quarter of the
    peak (MFU 25%)."""
    from types import SimpleNamespace

    from infermeter.generate.cases import Case, PromptSet
    from infermeter.generate.loop import CaseRun, roofline_metrics
    from infermeter.generate.timing import RunTiming

    model = SimpleNamespace(spec=LLAMA2, tok_embeddings=SimpleNamespace(
        weight=torch.empty(0, dtype=torch.float16)))
    case = Case(PromptSet(((1,) * 2048,), "user"), "eager", 4096)
    repeats = [[RunTiming(1, 2048, ttft, [4.0], new_tokens=2)] for ttft in (1200.0, 1000.0, 800.0)]
    run = CaseRun(repeats, [], [], 0.0, 0.0, {}, {})
    peaks = rl.Roofline("cuda:0", hbm_gbps=2 * 3572.240384, matmul_tflops=4 * 27.626028662784)
    m = roofline_metrics(model, case, run, 4.0, peaks, "float16")
    assert m["bytes_per_decode_step"] == 14_288_961_536
    assert m["decode_gbps"] == pytest.approx(3572.240384, rel=1e-12)
    assert m["mbu_pct"] == pytest.approx(50.0, rel=1e-12)
    assert m["decode_tok_per_s_roofline"] == pytest.approx(500.0, rel=1e-12)
    assert m["prefill_flops"] == 27_626_028_662_784
    assert m["prefill_tflops"] == pytest.approx(27.626028662784, rel=1e-12)
    assert m["mfu_pct"] == pytest.approx(25.0, rel=1e-12)
    assert m["hbm_gbps_measured"] == 2 * 3572.240384
