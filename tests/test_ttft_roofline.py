"""TTFT against its roofline: the prefill's two floors (its bytes at the HBM bandwidth, its FLOPs
at the matmul peak), the crossover prompt length where it turns compute-bound, on synthetic
cards; generate's table and Result fields; the --prefill choice; the TTFT benchmark's dry run.
"""

from __future__ import annotations

import pytest

from infermeter.measure import roofline as rl
from infermeter.measure.result import Result
from infermeter.specs import sizes
from infermeter.specs.presets import PRESETS
from tests.benchmark_scripts import load_benchmark
from tests.cli_in_process import run_cli

LLAMA = PRESETS["llama-2-7b"]
CARD = {"hbm_gbps": 1000.0, "matmul_tflops": 100.0}  # a synthetic card: 100 FLOP per byte


def crossover(spec=LLAMA, batch=1, **card):
    card = {**CARD, **card}
    return rl.prefill_crossover_len(spec, batch, "fp16", "fp16", card["hbm_gbps"],
                                    card["matmul_tflops"])


def first_compute_bound(spec, batch, hbm, tflops, up_to):
    """The same answer by a scan over every length."""
    for length in range(1, up_to):
        memory, compute = rl.prefill_floor_ms(spec, batch, length, "fp16", "fp16", hbm, tflops)
        if compute >= memory:
            return length
    return None


def test_crossover_on_synthetic_cards():
    # ~2 bytes read per 2 FLOPs a token per weight: compute-bound past ~ratio / batch tokens
    # (less a little for attention, more a little for the K/V written and the embedding rows)
    at = crossover()
    assert at == first_compute_bound(LLAMA, 1, 1000.0, 100.0, 400)
    assert 95 <= at <= 105
    assert 190 <= crossover(matmul_tflops=200.0) <= 210  # twice the FLOP/s: twice the length
    assert 45 <= crossover(hbm_gbps=2000.0) <= 55  # twice the bandwidth: half
    assert crossover(batch=4) == -(-at // 4) or abs(crossover(batch=4) - at / 4) <= 1
    # an H200-like card, measured figures of the order the issue quotes: ~200 tokens
    h200 = crossover(hbm_gbps=4173.0, matmul_tflops=800.0)
    assert h200 == first_compute_bound(LLAMA, 1, 4173.0, 800.0, 400)
    # no peaks: unknown; a card whose FLOP/s never catch up within the context: None
    assert rl.prefill_crossover_len(LLAMA, 1, "fp16", "fp16", None, 100.0) is None
    assert crossover(matmul_tflops=1e9) is None


def test_ttft_roofline_fields():
    short, long = (1, 80), (1, 2048)
    memory, compute = rl.prefill_floor_ms(LLAMA, 1, 80, "fp16", "fp16", **CARD)
    assert memory > compute  # 80 tokens: the weights' read sets the floor
    weights = rl.decode_weight_bytes(LLAMA, "fp16", 80)
    assert rl.prefill_bytes(LLAMA, 1, 80, "fp16", "fp16") == \
        weights + sizes.kv_cache_bytes(LLAMA, 1, 80, "fp16")
    out = rl.ttft_roofline(LLAMA, [short], 2 * memory, "fp16", "fp16", **CARD)
    assert out["ttft_floor_ms"] == pytest.approx(memory)
    assert out["ttft_over_floor"] == pytest.approx(2.0)
    assert out["prefill_mbu_pct"] == pytest.approx(50.0)
    assert (out["prefill_bound"], out["prefill_crossover_len"]) == ("memory", crossover())
    assert rl.ttft_roofline(LLAMA, [long], 100.0, "fp16", "fp16", **CARD)["prefill_bound"] == \
        "compute"
    both = rl.ttft_roofline(LLAMA, [short, long], 100.0, "fp16", "fp16", **CARD)
    assert both["prefill_bound"] == "mixed"
    assert both["ttft_floor_ms"] == pytest.approx(
        memory + max(rl.prefill_floor_ms(LLAMA, 1, 2048, "fp16", "fp16", **CARD)))
    unmeasured = rl.ttft_roofline(LLAMA, [short], 5.0, "fp16", "fp16", None, None)
    assert unmeasured["ttft_floor_ms"] is None and unmeasured["prefill_bytes"] > 0


def result(prompt: int, bound: str, crossover_len: int) -> Result:
    config = {"batch_size": 1, "prompt_len": prompt, "context": None, "mode": "compiled",
              "weights": "random", "dtype": "fp16", "kv_dtype": "fp16", "repeats": 5,
              "warmup": 1}
    metrics = {"ttft_ms": 9.0, "ttft_floor_ms": 3.25, "prefill_bound": bound,
               "prefill_mbu_pct": 36.1, "mfu_pct": 12.0, "prefill_crossover_len": crossover_len}
    return Result("generate", {"name": "llama-2-7b"}, config, {"device_name": "gpu"}, metrics)


def test_the_generate_table_shows_the_floor_its_bound_and_the_crossover():
    from infermeter.generate.table import HEADER, render_generate

    text = render_generate([result(80, "memory", 203)])
    row = next(line for line in text.splitlines() if line.split()[:2] == ["1", "80"])
    cells = row.split()
    assert "TTFT floor ms" in text and "prefill MBU %" in text and len(HEADER) == 14
    assert cells[5:7] == ["3.25", "(memory)"] and "36.1" in cells
    assert "prefill of batch 1 turns compute-bound at 203 prompt tokens" in text


# a generate run on the debug model that is over in a moment: 2 tokens, one timed run
QUICK_GENERATE = ("generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "2",
                  "--repeats", "1", "--warmup", "0", "--no-roofline")


def test_prefill_choice_is_checked_and_recorded():
    args = QUICK_GENERATE
    both = run_cli(*args, "--prefill", "bucketed", "--compile-prefill")
    assert both.returncode != 0 and both.stderr.count("\n") == 1
    assert both.stderr.startswith("infermeter: error: --compile-prefill")
    assert run_cli(*args, "--prefill", "padded").returncode == 2
    import json

    eager = run_cli(*args, "--mode", "eager", "--prefill", "bucketed", "--json")
    assert eager.returncode == 0, eager.stderr
    config = json.loads(eager.stdout)["config"]
    assert (config["prefill"], config["prefill_forward_lens"]) == ("exact", [6])  # never pads


def test_prefill_graphs_flag_reaches_the_request_and_is_checked(monkeypatch):
    """--prefill-graphs picks the bucketed prefill's graphs for an A/B in separate processes;
    beside an exact prefill it would be ignored, so it is an error there."""
    import infermeter.generate.job as job

    args = QUICK_GENERATE
    for exact in (("--prefill", "exact"), ("--compile-prefill",)):
        both = run_cli(*args, "--prefill-graphs", "static", *exact)
        assert both.returncode != 0 and both.stderr.count("\n") == 1, both.stderr
        assert both.stderr.startswith("infermeter: error: --prefill-graphs static")
    assert run_cli(*args, "--prefill-graphs", "tiled").returncode == 2
    seen = []

    def record(request, env, progress=None):
        seen.append(request.engine.prefill_graphs)
        return [], []

    monkeypatch.setattr(job, "run_generate", record)
    for extra, graphs in (((), "layer"), (("--prefill-graphs", "static"), "static"),
                          (("--prefill-graphs", "dynamic"), "dynamic")):
        done = run_cli(*args, *extra)
        assert done.returncode == 0, done.stderr
        assert seen[-1] == graphs
    assert len(seen) == 3


def test_request_prefill_kind():
    from infermeter.errors import InfermeterError
    from infermeter.generate.request import EngineChoices

    assert EngineChoices().prefill_kind == "bucketed"
    assert EngineChoices(compile_prefill=True).prefill_kind == "exact"
    with pytest.raises(InfermeterError, match="unknown prefill 'padded'"):
        EngineChoices(prefill="padded")


def test_the_ttft_benchmark_plans_its_parts_and_judges_its_targets(capsys):
    sweep = load_benchmark("ttft_sweep")
    assert sweep.main(["--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    # each A/B's four runs (512- and 2048-token caches), the TTFT ladder, the long prompt with
    # each chunk attention, the warm-up A/B (the default prefill graphs last)
    assert len(planned) == 4 + 4 + 1 + 2 + 3
    assert [line.split(": ")[1] for line in planned] == [
        "ab-bucketed-1", "ab-exact-2", "ab-bucketed-3", "ab-exact-4", "ablong-bucketed-1",
        "ablong-exact-2", "ablong-bucketed-3", "ablong-exact-4", "ttft", "long", "long-flex",
        "warmup-layer", "warmup-dynamic", "warmup-static"]
    assert all("'share_compiled': True" in line for line in planned[-3:])
    assert "'prefill_graphs': 'layer'" in planned[-3]
    assert "'prefill_graphs': 'dynamic'" in planned[-2]
    assert "'prompt_lens': (80,)" in planned[0] and "'max_seq_len': 512" in planned[0]
    assert "'prompt_lens': (1616,)" in planned[4] and "'max_seq_len': 2048" in planned[4]
    assert "'chunk_attention': 'flex'" in planned[-4] and "'chunk_attention': 'mask'" in planned[-5]

    def ab(kind: str, i: int, tpot: float) -> Result:
        return Result("generate", {"name": "llama-2-7b"},
                      {"run": f"ab-{kind}-{i}", "mode": "compiled", "prompt_len": 80},
                      {"timestamp": "t"}, {"tpot_ms": {"p50": tpot}})

    results = [ab("bucketed", 1, 3.70), ab("exact", 2, 3.68), ab("bucketed", 3, 3.71),
               ab("exact", 4, 3.66)]
    assert sweep.tpot_gap_pct(results) == pytest.approx(100 * (3.705 / 3.67 - 1))
    assert "decode TPOT, bucketed over exact prefill (+: slower): 0.95 % (target <= 1 %) met" \
        in sweep.targets(results)
    faster = [ab("bucketed", 1, 3.60), ab("exact", 2, 3.68)]  # one-sided: a faster decode passes
    assert "(+: slower): -2.17 % (target <= 1 %) met" in sweep.targets(faster)
    assert sweep.tpot_gap_pct(results, "ablong") is None  # that part's runs only
    longer = [Result("generate", {"name": "llama-2-7b"},
                     {"run": f"ablong-{kind}-{i}", "mode": "compiled", "prompt_len": 1616},
                     {"timestamp": "t"}, {"tpot_ms": {"p50": tpot}})
              for kind, i, tpot in (("bucketed", 1, 4.40), ("exact", 2, 4.20))]
    assert sweep.tpot_gap_pct(results + longer, "ablong") == pytest.approx(100 * (4.4 / 4.2 - 1))
    assert sweep.tpot_gap_pct(results + longer) == pytest.approx(100 * (3.705 / 3.67 - 1))
    assert "the same at a 2048-token context: 4.76 % (target <= 1 %) MISSED" in \
        sweep.targets(results + longer)

    def long(run: str, mfu: float) -> Result:
        return Result("generate", {"name": "llama-3.1-8b"},
                      {"run": run, "mode": "compiled", "prompt_len": 32768},
                      {"timestamp": "t"}, {"mfu_pct": mfu})

    def warm(kind: str, prompt: int, seconds: float, ttft: float) -> Result:
        return Result("generate", {"name": "llama-2-7b"},
                      {"run": f"warmup-{kind}", "mode": "compiled", "prompt_len": prompt},
                      {"timestamp": "t"}, {"warmup_s": seconds, "ttft_ms": ttft})

    lens = sweep.WARMUP_LENS
    lines = sweep.warmup_lines([warm("static", n, 30.0, 10.0) for n in lens]
                               + [warm("dynamic", n, 20.0 if n == 80 else 2.0, 10.5)
                                  for n in lens]).splitlines()
    assert lines[1:] == ["  layer: -",  # a kind not run has no figure
                         "  dynamic: 26.0 s; 10.50, 10.50, 10.50, 10.50",
                         "  static: 120.0 s; 10.00, 10.00, 10.00, 10.00",
                         "  dynamic / static TTFT: 1.050, 1.050, 1.050, 1.050"]
    assert sweep.warmup_lines([warm("static", 80, 30.0, 10.0)]).splitlines()[1:] == \
        ["  layer: -", "  dynamic: -", "  static: -"]  # a kind missing a length: no figure

    verdicts = sweep.targets([long("long", 41.0), long("long-flex", 63.5)]).splitlines()
    assert "prefill MFU (llama-3.1-8b), mask chunks: 41.00 % (target >= 60 %) MISSED" \
        in verdicts[3]
    assert "prefill MFU, flex chunks (the default): 63.50 % (target >= 60 %) met" \
        in verdicts[4]


def test_the_reports_extended_table_shows_the_ttft_roofline():
    from infermeter.report.build import assemble
    from infermeter.report.load import Record
    from infermeter.report.select import Column, ColumnKey

    metrics = {"ttft_ms": 9.0, "ttft_floor_ms": 3.25, "prefill_bound": "memory",
               "prefill_mbu_pct": 36.1, "mfu_pct": 12.0, "prefill_crossover_len": 203,
               "total_tokens": 54, "generation_time_s": 0.3}
    gen = Record("generate", {"name": "m"}, {"batch_size": 1, "prompt_len": 80,
                                             "mode": "compiled"}, {"device_name": "gpu"},
                 metrics, (), "r.jsonl:1")
    report = assemble([Column(ColumnKey("gpu", "m", 1), generates=[gen])], [gen], [])
    (extended,) = [t for t in report.tables if t.key == "extended"]
    column = extended.header.index("gpu · m")
    cells = {row[0]: row[column] for row in extended.rows}
    assert cells["TTFT floor"] == "3.25 ms (memory)"
    assert cells["Prefill MBU"] == "36.1%" and cells["MFU"] == "12.0%"
    assert cells["Prefill compute-bound from"] == "203 tokens (batch 1)"
