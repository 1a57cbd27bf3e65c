"""`infermeter generate` end to end: random presets, a Meta checkpoint with its tokenizer, chat
dialogs, the seed's flag spellings, and bad input (one line, non-zero exit)."""

import functools
import json
import subprocess
import sys

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import load_weights, save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.measure.result import REQUIRED_FIELDS
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli
from tests.test_tokenizer import _corpus

SPEC = PRESETS["debug"].with_updates(vocab_size=320)  # room for the test tokenizer's 320 ids


def run(*args):
    """`infermeter generate ARGS` in this process (tests/cli_in_process.py)."""
    return run_cli("generate", *args)


def run_process(*args):
    """The same through `python -m infermeter`: the one check that the entry point generates."""
    return subprocess.run([sys.executable, "-m", "infermeter", "generate", *args],
                          capture_output=True, text=True, timeout=300)


@functools.cache
def generate_json(*args) -> dict:
    """One run's Result, shared by the tests that ask for the same run (each compiled run costs
    a torch.compile); callers only read it."""
    out = run(*args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def meta_checkpoint(tmp_path_factory):
    """A Meta-format folder (params.json + 2 shards) with a sentencepiece tokenizer.model."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("llama-tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(folder / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    save_checkpoint(build_model(SPEC, seed=7), folder, fmt="meta", n_shards=2)
    return folder


def test_random_preset_json_matches_the_engine():
    out = run_process("--model", "debug", "--device", "cpu", "--max-new-tokens", "8",
                      "--prompt-ids", "1,2,3,4", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["kind"] == "generate" and result["schema"] == 1
    assert result["config"]["mode"] == "eager" and result["config"]["device"] == "cpu"
    (ids,) = result["output_token_ids"]
    assert len(ids) == 8 and result["metrics"]["total_tokens"] == 8
    # The same seed, weights and prompt in-process give the same tokens.
    model = load_weights("random:debug", "cpu", "float32", seed=0)
    expected = Generator(model).generate([[1, 2, 3, 4]], GenerationConfig(max_new_tokens=8))
    assert ids == expected.output_token_ids[0]


def test_meta_checkpoint_with_text_prompts_and_seed_flags(meta_checkpoint):
    out = run("--ckpt_dir", str(meta_checkpoint), "--device", "cpu", "--max_seq_len", "64",
              "--max_batch_size", "1", "--prompt", "hello world", "--prompt", "Paris France art",
              "--max-new-tokens", "5", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [len(ids) for ids in result["output_token_ids"]] == [5, 5]
    lengths = result["config"]["prompt_lengths"]
    assert len(lengths) == 2 and all(n > 1 for n in lengths)  # bos + the encoded text


def test_chat_dialogs_and_text_output(meta_checkpoint, tmp_path):
    dialogs = [[{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "hello world"}],
               [{"role": "user", "content": "ka lo mi"}]]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    out = run("--checkpoint", str(meta_checkpoint), "--device", "cpu", "--dialogs", str(path),
              "--chat-format", "llama2", "--max-new-tokens", "4", "--until-eos")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # The two outputs first (exactly two), then the timing table of the one case.
    assert lines[0].startswith("[0] ") and lines[1].startswith("[1] ")
    assert not lines[2].startswith("[") and lines[3].split()[:2] == ["batch", "prompt"]
    assert lines[5].split()[:2] == ["2", "mixed"] and lines[5].split()[3] == "eager"


def test_sampling_is_seeded():
    args = ("--model", "debug", "--device", "cpu", "--max-new-tokens", "12", "--temperature",
            "0.8", "--top-p", "0.9", "--json")
    first = json.loads(run(*args, "--seed", "3").stdout)
    again = json.loads(run(*args, "--seed", "3").stdout)
    assert first["output_token_ids"] == again["output_token_ids"]
    assert first["config"]["greedy"] is False


def test_a_chunked_prefill_gives_the_same_tokens_and_is_recorded():
    """--prefill-chunk runs a 10-token prompt as forwards of 4, 4 and 2 tokens: the same greedy
    tokens as one forward, the chunk in the Result, and a fit check that counts one chunk's
    activations rather than the whole prompt's."""
    from infermeter.generate.memory import case_memory
    from infermeter.specs.presets import PRESETS

    args = ("--model", "debug", "--device", "cpu", "--prompt-len", "10", "--max-new-tokens", "5",
            "--repeats", "1", "--warmup", "0", "--no-roofline", "--json")
    whole = generate_json(*args)
    chunked = generate_json(*args, "--prefill-chunk", "4")
    assert chunked["output_token_ids"] == whole["output_token_ids"]
    assert (chunked["config"]["prefill_chunk"], whole["config"]["prefill_chunk"]) == (4, None)
    spec = PRESETS["llama-2-7b"]
    one = case_memory(spec, 1, 8192, 8192, "bf16", "bf16", "compiled")
    chunk = case_memory(spec, 1, 8192, 8192, "bf16", "bf16", "compiled", prefill_chunk=512)
    # the FFN's activations scale with the forward; the logits are one row either way
    logits = spec.vocab_size * (2 + 4)  # [1, 1, V] in bf16 and its float32 copy
    assert (chunk["prefill activations"] - logits) * 16 == one["prefill activations"] - logits
    assert run(*args, "--prefill-chunk", "0").returncode == 2


def test_compiled_mode_on_cpu_gives_the_eager_tokens():
    args = ("--model", "debug", "--device", "cpu", "--max-new-tokens", "6", "--json")
    eager = generate_json(*args, "--mode", "eager")
    compiled = generate_json(*args, "--mode", "compiled")
    assert compiled["output_token_ids"] == eager["output_token_ids"]
    assert compiled["config"]["compile_prefill"] is False
    # the compiled mode's default prefill: the 6-token prompt padded to the 16-token bucket
    assert (compiled["config"]["prefill"], compiled["config"]["prefill_forward_lens"]) == \
        ("bucketed", [16])
    both = generate_json(*args, "--mode", "compiled", "--compile-prefill")
    assert both["output_token_ids"] == eager["output_token_ids"]
    assert both["config"]["compile_prefill"] is True
    assert (both["config"]["prefill"], both["config"]["prefill_forward_lens"]) == ("exact", [6])


def test_decode_attention_choice_is_applied_and_recorded():
    """--decode-attention sets every layer's choice and the Result says which; on the CPU the
    compiled "triton" choice (the default) falls back to the math attention, so the tokens stay
    eager's."""
    from infermeter.commands.generate import DECODE_ATTENTION_KINDS
    from infermeter.engine.attention import ATTENTION_KINDS

    assert DECODE_ATTENTION_KINDS == ATTENTION_KINDS
    args = ("--model", "debug", "--device", "cpu", "--max-new-tokens", "6", "--json")
    eager = generate_json(*args, "--mode", "eager")
    assert eager["config"]["decode_attention"] == "math"  # eager runs triton's fallback
    sdpa = generate_json(*args, "--mode", "eager", "--decode-attention", "sdpa")
    assert sdpa["config"]["decode_attention"] == "sdpa"
    assert sdpa["output_token_ids"] == eager["output_token_ids"]
    # The default attention (auto), and the Triton GEMV asked for, on a CPU without Triton's
    # interpreter: the math attention and inductor's products ran, and the Result says so.
    compiled = generate_json(*args, "--mode", "compiled", "--matvec-kernel", "triton")
    assert compiled["config"]["decode_attention"] == "math"
    assert (compiled["config"]["matvec_kernel"], eager["config"]["matvec_kernel"]) == \
        ("inductor", None)
    assert compiled["output_token_ids"] == eager["output_token_ids"]
    default = generate_json(*args, "--mode", "compiled")
    assert default["config"]["matvec_kernel"] == "inductor"
    bad = run(*args, "--decode-attention", "paged")
    assert bad.returncode == 2 and "invalid choice: 'paged'" in bad.stderr
    assert "Traceback" not in bad.stderr


# The generate Result's metrics that other tools read (docs/design.md, the issue): all present.
SCHEMA_METRICS = ("ttft_ms", "ttft_stats", "tpot_ms", "decode_tok_per_s", "prefill_tok_per_s",
                  "total_tokens", "generation_time_s", "token_generation_speed", "warmup_s",
                  "mbu_pct", "mfu_pct", "decode_gbps", "bytes_per_decode_step",
                  "hbm_gbps_measured", "matmul_tflops_measured", "peak_allocated_bytes",
                  "peak_reserved_bytes", "process_gpu_memory_bytes")


def test_json_results_have_the_schema_fields():
    out = run("--model", "debug", "--device", "cpu", "--batch-size", "1", "2", "--prompt-len",
              "8", "--max-new-tokens", "4", "--repeats", "2", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2  # one Result per case
    for line, batch in zip(lines, (1, 2)):
        result = json.loads(line)
        assert set(REQUIRED_FIELDS) <= set(result) and result["kind"] == "generate"
        metrics = result["metrics"]
        assert set(SCHEMA_METRICS) <= set(metrics)
        assert set(metrics["tpot_ms"]) == {"p50", "p10", "p90", "p99", "mean", "cov", "n"}
        assert metrics["tpot_ms"]["n"] == 3 * 2 and len(result["samples"]["tpot_ms"]) == 6
        for name in ("ttft_ms", "decode_tok_per_s", "prefill_tok_per_s", "token_generation_speed",
                     "mbu_pct", "mfu_pct", "decode_gbps", "hbm_gbps_measured",
                     "matmul_tflops_measured"):  # the CPU runs the roofline too
            assert metrics[name] > 0, name
        assert metrics["total_tokens"] == batch * 4 and metrics["ttft_stats"]["n"] == 2
        assert result["config"]["batch_size"] == batch and result["config"]["prompt_len"] == 8
        assert [len(ids) for ids in result["output_token_ids"]] == [4] * batch


def test_modes_side_by_side_in_one_table(capsys):
    pytest.importorskip("transformers")
    code = main(["generate", "--model", "debug", "--device", "cpu", "--mode", "eager", "hf",
                 "--prompt-len", "8", "--max-new-tokens", "4", "--repeats", "2",
                 "--no-roofline"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("batch"))
    assert "TPOT p50 ms" in lines[header] and "MBU %" in lines[header]
    rows = [line.split() for line in lines[header + 2:header + 4]]
    assert [row[3] for row in rows] == ["eager", "hf"] and all(row[0] == "1" for row in rows)


@pytest.mark.parametrize("args, message", [
    (("--checkpoint", "/no/such/folder"), "/no/such/folder: no such checkpoint folder or GGUF "
     "file"),
    # pointed a missing file at random:NAME, which --model does not take
    (("--checkpoint", __file__), "not a checkpoint folder or GGUF file (random weights of a "
     "preset or config: --model NAME"),
    (("--model", "debug", "--device", "cpu", "--prompt-ids", ",".join(["5"] * 250),
      "--max-new-tokens", "10"), "does not fit"),
    (("--model", "debug", "--device", "cpu", "--prompt", "hi"), "need a tokenizer"),
    (("--model", "debug", "--device", "cpu", "--prompt-ids", "1,x"), "prompt"),
    (("--model", "phi-3-mini", "--device", "cpu"), "can be sized but not run"),
    (("--model", "debug", "--device", "cpu", "--dtype", "int8"), "not supported by the engine"),
    (("--model", "debug", "--device", "cpu", "--temperature", "0.5", "--top-p", "2"), "--top-p"),
    (("--device", "cpu"), "one of the arguments --checkpoint"),
])
def test_bad_input(args, message, tmp_path):
    out = run(*args, "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (("--context", "300"), "does not fit"),  # debug's context is 256 tokens
    (("--prompt-ids", "1,2", "--batch-size", "2"), "make random prompts"),
    (("--mode", "compiled", "--pdl"), "compute capability 9.0"),  # no GPU here: no PDL
])
def test_bad_timing_flags_in_process(args, message, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "debug", "--device", "cpu", *args, "--output",
                 str(output)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu():
    out = run("--model", "debug", "--device", "cuda")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def _eos_choice(row: list[int], other: list[int], last: int) -> int:
    """An index k in [3, last) whose token first appears at k in `row` and never in `other`."""
    for k in range(3, last):
        if row[k] not in row[:k] and row[k] not in other:
            return k
    pytest.fail(f"no usable EOS token in {row}: pick other prompts")


def test_until_eos_stops_at_the_tokenizers_eos_and_is_off_by_default(tmp_path, capsys):
    """--until-eos cuts a sequence at the tokenizer's own EOS id; without it a run is fixed
    length even though the tokenizer knows that id. Random `debug` weights and --prompt-ids
    make greedy's tokens known in advance; the tokenizer is then trained with its EOS at a token
    greedy emits at step k (no monkeypatching: the real stop ids reach the engine)."""
    spm = pytest.importorskip("sentencepiece")
    from infermeter.engine.text.tokenizer import load_tokenizer

    n_new, prompts = 24, [[1, 2, 3, 4], [5, 6, 7, 8]]
    model = load_weights("random:debug", "cpu", "float32", seed=0)  # the CLI's --seed 0 weights
    config = GenerationConfig(max_new_tokens=n_new)
    both = Generator(model).generate(prompts, config).output_token_ids
    alone = Generator(model).generate(prompts[:1], config).output_token_ids[0]
    interval = config.stop_check_interval  # the host sees "all done" at this step
    k = _eos_choice(both[0], both[1], interval)
    assert alone[:k + 1] == both[0][:k + 1]
    eos = both[0][k]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        num_threads=1, minloglevel=2, eos_id=eos)
    tokenizer = tmp_path / "tokenizer.model"
    assert load_tokenizer(tokenizer).stop_ids == {eos}

    def generate(*prompt_ids, until_eos):
        args = ["generate", "--model", "debug", "--device", "cpu", "--tokenizer-path",
                str(tokenizer), "--max-new-tokens", str(n_new), "--repeats", "1", "--warmup",
                "0", "--no-roofline", "--json"]
        args += [flag for ids in prompt_ids for flag in ("--prompt-ids", ",".join(map(str, ids)))]
        assert main(args + (["--until-eos"] if until_eos else [])) == 0
        (line,) = capsys.readouterr().out.strip().splitlines()
        result = json.loads(line)
        assert result["config"]["until_eos"] is until_eos
        return result["output_token_ids"], result["metrics"], result["samples"]

    # Default: EOS is an ordinary token; both sequences run the full length.
    ids, m, _ = generate(*prompts, until_eos=False)
    assert ids == both and ids[0][k] == eos and [len(row) for row in ids] == [n_new, n_new]
    assert m["finished"] == [False, False] and m["total_tokens"] == 2 * n_new
    assert m["decode_steps"] == n_new - 1

    # --until-eos: the first sequence ends before its EOS (k tokens kept, the stop id excluded),
    # the other runs on, so the batch still runs every step; only kept tokens are counted.
    ids, m, _ = generate(*prompts, until_eos=True)
    assert ids == [both[0][:k], both[1]] and m["finished"] == [True, False]
    assert m["total_tokens"] == k + n_new and m["decode_steps"] == n_new - 1
    assert m["token_generation_speed"] == pytest.approx(m["total_tokens"] /
                                                        m["generation_time_s"])

    # One sequence: once it has stopped the loop ends at the next host check, and the timing
    # counts the steps that ran (not max_new_tokens - 1) and the k tokens kept.
    ids, m, samples = generate(prompts[0], until_eos=True)
    assert ids == [alone[:k]] and m["finished"] == [True]
    assert m["total_tokens"] == k and m["decode_steps"] == interval
    assert m["tpot_ms"]["n"] == interval and len(samples["tpot_ms"]) == interval
    assert m["decode_context_range"] == [len(prompts[0]) + 1, len(prompts[0]) + interval]
    assert m["token_generation_speed"] == pytest.approx(k / m["generation_time_s"])
