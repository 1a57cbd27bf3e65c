"""engine/generator.py's COMPILE_TUNING (an A/B's setting): the compiled decode step asks
inductor for coordinate-descent tuning where it is "on" (the default) and not where "off"; the
Result records which as config.compile_tuning; the report takes "off" as a comparison."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from infermeter.engine import generator as generator_module
from infermeter.engine.generator import Generator
from infermeter.engine.model import build_model
from infermeter.report.select import DEFAULT_COMPILE_TUNING, off_default_kernels
from infermeter.specs.presets import PRESETS
from tests.report_records import seed_record
from tests.test_fused_rope_record import batch_one_runner


def compile_options_asked(monkeypatch, way: str) -> dict:
    """The options the decode step's torch.compile gets under COMPILE_TUNING `way` (compile
    itself recorded, not run)."""
    asked = {}
    monkeypatch.setattr(generator_module, "COMPILE_TUNING", way)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.update(kwargs) or fn)
    Generator(build_model(PRESETS["debug"], seed=1))._compile_step()
    return asked["options"]


@pytest.mark.parametrize("way", ["on", "off"])
def test_the_step_asks_for_tuning_as_the_setting_says_and_the_result_records_it(monkeypatch,
                                                                                way):
    assert compile_options_asked(monkeypatch, way)["coordinate_descent_tuning"] == (way == "on")
    runner = batch_one_runner(monkeypatch, PRESETS["debug"], "split")
    assert runner.describe()["compile_tuning"] == way
    assert off_default_kernels(seed_record(1, compile_tuning=way)) == (way == "off")


def test_an_unknown_way_is_refused_and_eager_records_none(monkeypatch):
    assert DEFAULT_COMPILE_TUNING == generator_module.COMPILE_TUNING == "on"  # the report's
    with pytest.raises(ValueError, match="unknown COMPILE_TUNING 'maybe'"):
        compile_options_asked(monkeypatch, "maybe")
    assert generator_module.COMPILE_TUNING_WAYS[0] == "on"  # the default first
    assert not off_default_kernels(seed_record(2))  # before the field: the default's
    runner = batch_one_runner(monkeypatch, PRESETS["debug"], "split")
    runner.config = replace(runner.config, compile=False)  # an eager case
    assert runner.describe()["compile_tuning"] is None
    runner.config = replace(runner.config, compile=True)
    runner.generator.compile_backend = "cudagraphs"  # inductor compiles nothing there
    assert runner.describe()["compile_tuning"] is None
