"""generate's compiled mode prefills a prompt longer than prefill_buckets.COMPILED_PREFILL_CHUNK in
chunks of it unless --prefill-chunk says otherwise (eager and the hf modes keep one forward); the
runner's Generator, the fit check and the Result all take the chunk the mode runs, and run's
prefill ladder uses the same constant. CPU: the compiled functions are replaced by the same
functions run eagerly (what is under test is which chunk runs, not inductor).
"""

from __future__ import annotations

import torch

import infermeter.engine.prefill_buckets as buckets
from infermeter.engine.generator import Generator, _decode_one, _prefill_forward
from infermeter.engine.model import build_model
from infermeter.engine.prefill_buckets import COMPILED_PREFILL_CHUNK
from infermeter.generate import memory
from infermeter.generate.cases import Case, PromptSet
from infermeter.generate.modes import EngineRunner
from infermeter.generate.request import EngineChoices, build_request
from infermeter.run import stages
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli

DEBUG = PRESETS["debug"].with_updates(n_layers=1)
PROMPT = 40  # with a chunk of 16: forwards of 16, 16 and 8 tokens (the last padded to 16)


def test_the_chunk_each_mode_runs():
    assert COMPILED_PREFILL_CHUNK == 2048 == stages.LADDER_CHUNK
    default = EngineChoices()
    assert (default.chunk_for("compiled"), default.chunk_for("eager"),
            default.chunk_for("hf")) == (COMPILED_PREFILL_CHUNK, None, None)
    asked = EngineChoices(prefill_chunk=512)  # --prefill-chunk overrides in every mode
    assert (asked.chunk_for("compiled"), asked.chunk_for("eager")) == (512, 512)
    # a chunk at least the prompt's length is one forward, padded to the prompt's bucket
    assert buckets.prefill_forwards(3000, 4096, 8192) == [(3000, 3072)]
    assert buckets.prefill_forwards(3000, COMPILED_PREFILL_CHUNK, 8192) == \
        [(2048, 2048), (952, 1024)]


def test_generate_help_names_the_default():
    out = run_cli("generate", "--help")
    assert f"{COMPILED_PREFILL_CHUNK} in compiled mode" in " ".join(out.stdout.split())


def test_a_compiled_case_runs_and_records_the_default_chunk(monkeypatch):
    monkeypatch.setattr(buckets, "COMPILED_PREFILL_CHUNK", 16)
    model = build_model(DEBUG, device="cpu", dtype=torch.float32, seed=4)
    tokens = torch.randint(0, DEBUG.vocab_size, (1, PROMPT),
                           generator=torch.Generator().manual_seed(4))
    prompts = PromptSet((tuple(tokens[0].tolist()),), "user")
    request = build_request("random:debug", max_new_tokens=4, modes=("compiled", "eager"))
    eager = EngineRunner(model, Case(prompts, "eager", 64), request)
    assert eager.generator.prefill_chunk is None
    want = eager.generator.generate(tokens, eager.config).output_token_ids

    runner = EngineRunner(model, Case(prompts, "compiled", 64), request)
    gen = runner.generator
    assert gen.prefill_chunk == 16 and gen.bucketed_prefill
    gen._compiled_prefill, gen._compiled_step = _prefill_forward, _decode_one  # run eagerly
    lengths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        got = gen.generate(tokens, runner.config).output_token_ids
    finally:
        handle.remove()
    assert lengths[:3] == [16, 16, 16] and set(lengths[3:]) == {1}  # 3 chunks, then decode
    assert got == want
    runner.batch_sizes, runner.prompt_lens = [1], [PROMPT]
    described = runner.describe()
    assert (described["prefill_chunk"], described["prefill_forward_lens"]) == (16, [16])
    # an explicit chunk wins
    asked = build_request("random:debug", modes=("compiled",), prefill_chunk=32)
    assert EngineRunner(model, Case(prompts, "compiled", 64), asked).generator.prefill_chunk == 32
    assert Generator(model).prefill_chunk is None  # the engine's own default: one forward


def test_the_fit_check_counts_each_modes_chunk(monkeypatch):
    """A compiled case's activations are one default chunk's, an eager case's the prompt's."""
    monkeypatch.setattr(buckets, "COMPILED_PREFILL_CHUNK", 16)
    seen = {}

    def case_memory(spec, batch, prompt_len, cache_len, dtype, kv_dtype, mode, tp, all_reduce,
                    prefill_chunk, *rest):
        seen[mode] = prefill_chunk
        return {"weights": 0}

    monkeypatch.setattr(memory, "case_memory", case_memory)
    prompts = PromptSet(((1,) * PROMPT,), "user")
    cases = [Case(prompts, mode, 64) for mode in ("compiled", "eager")]
    memory.check_cases_fit(DEBUG, cases, "fp32", "fp32", torch.device("cpu"))
    assert seen == {"compiled": 16, "eager": None}
    memory.check_cases_fit(DEBUG, cases, "fp32", "fp32", torch.device("cpu"), prefill_chunk=8)
    assert seen == {"compiled": 8, "eager": 8}
