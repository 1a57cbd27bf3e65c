"""The Result's config.fused_rope says whether the fused step's wqkv kernel also ropes q and k
and writes the cache (Attention.ropes_in_wqkv), beside config.step_kernels; config.
qk_norm_kernels how a fused layer ran its per-head q/k norms
(kernels/qk_norm_rope.QK_NORM_KERNELS)."""

from dataclasses import replace

import pytest

from infermeter.engine.kernels import qk_norm_rope
from infermeter.engine.model import build_model
from infermeter.generate import modes as modes_module
from infermeter.generate.cases import plan_cases, prompt_sets
from infermeter.generate.modes import EngineRunner
from infermeter.generate.request import EngineChoices, GenerateRequest
from infermeter.specs.presets import PRESETS


def _described(monkeypatch, spec, mode="compiled", kinds="fused", kv_dtype=None, batch=1):
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: True)
    sets = prompt_sets((1,), (4,), (), spec.vocab_size, 0, ())
    case = plan_cases(spec, sets, (mode,), 4, None, None)[0]
    request = GenerateRequest("random:debug", kv_dtype=kv_dtype,
                              engine=EngineChoices(step_kernels=kinds))
    runner = EngineRunner(build_model(spec, seed=1), case, request)
    runner.batch_sizes = [batch]
    out = runner.describe()
    return out["step_kernels"], out["fused_rope"]


def batch_one_runner(monkeypatch, spec, kinds="fused") -> EngineRunner:
    """A compiled batch-1 case's runner of `spec` with `kinds` step kernels, as if Triton ran:
    its describe() is what the Result records."""
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: True)
    sets = prompt_sets((1,), (4,), (), spec.vocab_size, 0, ())
    case = plan_cases(spec, sets, ("compiled",), 4, None, None)[0]
    request = GenerateRequest("random:debug", engine=EngineChoices(step_kernels=kinds))
    runner = EngineRunner(build_model(spec, seed=1), case, request)
    runner.batch_sizes = [1]
    return runner


def recorded_under(monkeypatch, key: str,
                   cases: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], object]:
    """config[key] of a compiled batch-1 debug case for each (step kernels, decode attention
    that ran) in cases: what the Result records for each."""
    described = {}
    for kinds, attention in cases:
        runner = batch_one_runner(monkeypatch, PRESETS["debug"], kinds)
        monkeypatch.setattr(runner.generator, "decode_attention_used",
                            lambda *args, kind=attention: kind)
        described[kinds, attention] = runner.describe()[key]
    return described


def _qk_norm_kernels(monkeypatch, spec, kinds="fused") -> int | None:
    return batch_one_runner(monkeypatch, spec, kinds).describe()["qk_norm_kernels"]


def test_fused_rope_is_recorded_beside_step_kernels(monkeypatch):
    debug = PRESETS["debug"]
    assert _described(monkeypatch, debug) == ("fused", True)
    # q/k norms (Qwen3's) are normed in the same kernel, a head a program
    assert _described(monkeypatch, replace(debug, qk_norm=True)) == ("fused", True)
    # ... where a head is a Triton block: head_dim a power of two, else torch ropes and writes
    assert _described(monkeypatch, replace(debug, qk_norm=True, head_dim=24)) == ("fused", False)
    # a cache of another dtype than the activations: likewise
    assert _described(monkeypatch, debug, kv_dtype="bfloat16") == ("fused", False)
    # no fused layer, nothing to say
    assert _described(monkeypatch, debug, kinds="split") == ("split", None)
    assert _described(monkeypatch, debug, batch=2) == ("split", None)
    assert _described(monkeypatch, debug, mode="eager") == (None, None)


@pytest.mark.parametrize("kernels", [1, 2])
def test_the_q_k_norms_way_is_recorded(monkeypatch, kernels):
    """2 (the default): the q/k norms in a kernel after norm + wqkv; 1: in wqkv's kernel;
    None without q/k norms, where torch ropes (head_dim 24), or with split kernels."""
    monkeypatch.setattr(qk_norm_rope, "QK_NORM_KERNELS", kernels)
    debug = PRESETS["debug"]
    assert _qk_norm_kernels(monkeypatch, replace(debug, qk_norm=True)) == kernels
    assert _qk_norm_kernels(monkeypatch, debug) is None
    assert _qk_norm_kernels(monkeypatch, replace(debug, qk_norm=True, head_dim=24)) is None
    assert _qk_norm_kernels(monkeypatch, replace(debug, qk_norm=True), kinds="split") is None
