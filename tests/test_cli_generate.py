"""`infermeter generate` end to end: random presets, a Meta checkpoint with its tokenizer, chat
dialogs, the seed's flag spellings, and bad input (one line, non-zero exit)."""

import json
import subprocess
import sys

import pytest
import torch

from infermeter.engine.checkpoint import load_weights, save_checkpoint
from infermeter.engine.generate import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.presets import PRESETS
from tests.test_tokenizer import _corpus

SPEC = PRESETS["debug"].with_updates(vocab_size=320)  # room for the test tokenizer's 320 ids


def run(*args):
    return subprocess.run([sys.executable, "-m", "infermeter", "generate", *args],
                          capture_output=True, text=True, timeout=300)


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
    out = run("--model", "debug", "--device", "cpu", "--max-new-tokens", "8",
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
    assert len(lines) == 2 and lines[0].startswith("[0] ") and lines[1].startswith("[1] ")


def test_sampling_is_seeded():
    args = ("--model", "debug", "--device", "cpu", "--max-new-tokens", "12", "--temperature",
            "0.8", "--top-p", "0.9", "--json")
    first = json.loads(run(*args, "--seed", "3").stdout)
    again = json.loads(run(*args, "--seed", "3").stdout)
    assert first["output_token_ids"] == again["output_token_ids"]
    assert first["config"]["greedy"] is False


def test_compiled_mode_on_cpu_gives_the_eager_tokens():
    args = ("--model", "debug", "--device", "cpu", "--max-new-tokens", "6", "--json")
    eager = json.loads(run(*args, "--mode", "eager").stdout)
    compiled = json.loads(run(*args, "--mode", "compiled").stdout)
    assert compiled["output_token_ids"] == eager["output_token_ids"]


@pytest.mark.parametrize("args, message", [
    (("--checkpoint", "/no/such/folder"), "not a checkpoint folder"),
    (("--model", "debug", "--device", "cpu", "--prompt-ids", ",".join(["5"] * 250),
      "--max-new-tokens", "10"), "does not fit"),
    (("--model", "debug", "--device", "cpu", "--prompt", "hi"), "need a tokenizer"),
    (("--model", "debug", "--device", "cpu", "--prompt-ids", "1,x"), "prompt"),
    (("--model", "gemma-2-9b", "--device", "cpu"), "can be sized but not run"),
    (("--model", "debug", "--device", "cpu", "--dtype", "int8"), "not supported by the engine"),
    (("--model", "debug", "--device", "cpu", "--temperature", "0.5", "--top-p", "2"), "top_p"),
    (("--device", "cpu"), "one of the arguments --checkpoint"),
])
def test_bad_input(args, message, tmp_path):
    out = run(*args, "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu():
    out = run("--model", "debug", "--device", "cuda")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr
