"""The Result's config.silu_block: the columns a program of the SwiGLU activation kernel
handled (kernels/swiglu.py's BLOCK, an A/B's setting), where a compiled run could launch that
kernel; the report takes a Result at another block as a comparison."""

from __future__ import annotations

from dataclasses import replace

import pytest

from infermeter.engine import model as model_module
from infermeter.engine.kernels import swiglu
from infermeter.generate import modes as modes_module
from infermeter.report.select import DEFAULT_SILU_BLOCK, off_default_kernels
from infermeter.specs.presets import PRESETS
from tests.report_records import seed_record
from tests.test_fused_rope_record import batch_one_runner


@pytest.mark.parametrize("block", [1024, 128])
def test_a_compiled_swiglu_run_records_the_block_and_others_record_none(monkeypatch, block):
    monkeypatch.setattr(swiglu, "BLOCK", block)
    debug = PRESETS["debug"]
    for kinds in ("split", "fused"):  # the split step launches it; a fused step's prefill does
        assert batch_one_runner(monkeypatch, debug, kinds).describe()["silu_block"] == block
    # GeGLU (Gemma) computes its own activation; "aten" and "inline" launch no Triton kernel
    gemma = replace(debug, arch="gemma2")
    assert batch_one_runner(monkeypatch, gemma, "split").describe()["silu_block"] is None
    for way in ("aten", "inline"):
        monkeypatch.setattr(model_module, "ACTIVATION_KERNEL", way)
        assert batch_one_runner(monkeypatch, debug).describe()["silu_block"] is None
    monkeypatch.setattr(model_module, "ACTIVATION_KERNEL", "triton")
    runner = batch_one_runner(monkeypatch, debug)
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: False)  # no Triton there
    assert runner.describe()["silu_block"] is None


def test_the_report_takes_another_block_as_a_comparison():
    assert DEFAULT_SILU_BLOCK == swiglu.BLOCKS[-1] == 1024
    assert not off_default_kernels(seed_record(1, silu_block=DEFAULT_SILU_BLOCK))
    assert off_default_kernels(seed_record(2, silu_block=128))
    assert not off_default_kernels(seed_record(3))  # before the field: the default's
    assert not off_default_kernels(seed_record(4, silu_block=None))  # no such kernel ran
