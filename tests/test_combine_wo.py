"""The split-KV attention's combine folded into wo + the residual add (engine/kernels/
combine_wo.py, FOLD "on").

Under Triton's CPU interpreter in a subprocess (tests/combine_wo_worker.py): the folded kernel
against a float64 combine with the dtype's roundings and against the two kernels it replaces
(float32, float16, bfloat16; sinks; empty splits; ragged tiles), its tiles, and the debug
model's fused steps folded against not and against eager. No GPU: which is faster is
benchmarks/step_kernels_ab.py --fold-combine's to say.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("combine_wo_worker.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_folded_combine_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


@pytest.mark.parametrize("fold", ["off", "on"])
def test_the_result_records_the_fold_and_the_report_sets_it_aside(monkeypatch, fold):
    """config.combine_in_wo: whether the fused step's wo combined the split-KV attention's
    splits (FOLD), None where no fused wo followed that attention (split kernels, another
    attention, eager); the report takes a folded Result as a comparison, never the column's
    representative."""
    from infermeter.engine.kernels import combine_wo
    from infermeter.report.select import off_default_kernels
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import recorded_under

    monkeypatch.setattr(combine_wo, "FOLD", fold)
    described = recorded_under(monkeypatch, "combine_in_wo", (
        ("fused", "triton"), ("fused", "math"), ("split", "triton")))
    assert described == {("fused", "triton"): fold == "on", ("fused", "math"): None,
                         ("split", "triton"): None}
    assert off_default_kernels(seed_record(1, combine_in_wo=fold == "on")) == (fold == "on")
    assert not off_default_kernels(seed_record(2))  # before the field: not folded


def test_an_unknown_fold_is_refused(monkeypatch):
    from infermeter.engine.kernels import combine_wo

    monkeypatch.setattr(combine_wo, "FOLD", "maybe")
    with pytest.raises(ValueError, match="unknown FOLD 'maybe'"):
        combine_wo.folds()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_folded_kernel_reads_only_weights_before_the_wait_and_divides_exactly(monkeypatch):
    """Launched with PDL, compiled for sm_90: before the wait only the first weight tile is
    loaded (evict-first); the partials and the residual after it; the combine's one division
    is div.rn (as the combine kernel's), no approximate one."""
    import torch

    from infermeter.engine.kernels.combine_wo import _combine_gemv_add
    from tests.test_fused_step import assert_exact_divisions
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    acc = torch.zeros(3, 8, 3, 64)
    m, l_sum = torch.zeros(3, 8, 3), torch.ones(3, 8, 3)
    weight, residual = torch.zeros(576, 576, dtype=torch.bfloat16), \
        torch.zeros(1, 576, dtype=torch.bfloat16)
    launches = pdl_launches(monkeypatch, lambda: _combine_gemv_add(
        acc, m, l_sum, None, weight, residual, pdl=True))
    assert len(launches) == 1
    lines, wait = pdl_ptx(launches[0], "combine + wo + add")
    early = [line for line in lines[:wait] if "ld.global" in line]
    assert early and all("evict_first" in line for line in early)
    assert first(lines, "ld.global", wait) < len(lines)  # the partials, after the wait
    assert_exact_divisions(lines, True, "combine + wo + add")


def test_an_older_trees_baseline_is_never_a_columns_figure():
    """config.ab.baseline (step_kernels_ab.py --baseline: the A/B's run of an older source
    tree, timed after the new one) and config.ab.environment (a setting made in the process's
    environment, outside the engine): the report sets either aside as a comparison, however
    late its timestamp; a plain A/B case stays a candidate."""
    from infermeter.report.select import off_default_kernels
    from tests.report_records import seed_record

    assert off_default_kernels(seed_record(1, ab={"kernels": "fused", "round": 0,
                                                  "baseline": True}))
    assert not off_default_kernels(seed_record(1, ab={"kernels": "fused", "round": 0}))
    assert off_default_kernels(seed_record(1, ab={"environment": "TORCHINDUCTOR_ENABLE_PDL=1"}))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_folded_kernel_holds_its_tiles_in_registers(monkeypatch, tmp_path):
    """Built for sm_90 at SmolLM2-135M's, Qwen2.5-0.5B's and Llama-3.2-1B's shapes (the
    default tiles, 8 splits): the weight tile and the partials [S_PAD, H_PAD, D] a program
    holds spill nothing to local memory, and a program's registers fit an SM."""
    import torch

    from infermeter.engine.kernels.combine_wo import _combine_gemv_add
    from tests.sm90_build import sm90_binary, sm90_registers
    from tests.test_pdl import pdl_launches

    for kv_heads, groups, width in ((3, 3, 576), (2, 7, 896), (8, 4, 2048)):
        acc = torch.zeros(kv_heads, 8, groups, 64)
        m, l_sum = torch.zeros(kv_heads, 8, groups), torch.ones(kv_heads, 8, groups)
        weight = torch.zeros(width, width, dtype=torch.bfloat16)
        residual = torch.zeros(1, width, dtype=torch.bfloat16)
        operands = (acc, m, l_sum, None, weight, residual)
        (kernel, args, kwargs), = pdl_launches(
            monkeypatch, lambda ops=operands: _combine_gemv_add(*ops, pdl=True))
        folder = tmp_path / str(width)
        folder.mkdir()
        registers, spilled = sm90_registers(sm90_binary(kernel, args, kwargs).asm["ptx"], folder)
        assert spilled == 0, (width, registers, spilled)
        assert registers * 32 * kwargs["num_warps"] <= 65536, (width, registers)
