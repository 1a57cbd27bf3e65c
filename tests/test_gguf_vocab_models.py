"""Qwen3's and Gemma 2/3's GGUF vocabularies, written as llama.cpp's converter writes them, read by
gguf_vocab.py: ids, decoded text, chat-template ids and stop ids match transformers' own GGUF
tokenizer for the same file."""

from __future__ import annotations

import json

import pytest

from infermeter.engine.text.chat import encode_template_dialog
from infermeter.engine.text.template import render_chat
from infermeter.engine.text.tokenizer import load_tokenizer
from infermeter.errors import InfermeterError
from tests.gguf_files import write_vocab_gguf
from tests.test_tokenizer import _corpus

TEXTS = ["hello world", "  two leading spaces", "tabs\tand\nnew lines\n\n", "a\n\n\nb",
         "héllo wörld ✓ 日本", "Paris France art 123 4567", " x ", "<end_of_turn> as text",
         "x 123 861,hello\n\n\nDON'T\tok. x 9"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo\nworld"},
          {"role": "assistant", "content": "ok ✓"}, {"role": "user", "content": "again"}]

# The models' own templates, cut to what a plain dialog uses.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _transformers(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _check_against_transformers(path, hf, messages_end: str) -> None:
    tok = load_tokenizer(path)
    for text in TEXTS:
        ids = tok.encode(text)
        # A prompt's control-token text stays text (tokenizer.py's rule): split_special_tokens.
        assert ids == hf.encode(text, add_special_tokens=False, split_special_tokens=True), text
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.encode(text, bos=True) == hf.encode(text, split_special_tokens=True), text
    rendered = render_chat(tok.chat_template, DIALOG, tok.template_tokens())
    assert rendered == hf.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=True)
    ids = tok.encode_with_specials(rendered)
    assert ids == hf.encode(rendered, add_special_tokens=False)
    assert ids.count(tok.special_id(messages_end)) == len(DIALOG)  # each turn's end token whole
    assert tok.decode(ids) == rendered
    # The chat path adds no BOS of its own: Gemma's template writes the one <bos>.
    assert encode_template_dialog(tok, DIALOG) == ids == list(hf.apply_chat_template(
        DIALOG, tokenize=True, add_generation_prompt=True, return_dict=False))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Gemma's layout: <pad> <eos> <bos> <unk> at 0..3, the turn markers as control tokens, then
    a sentencepiece BPE vocabulary with byte fallback; no space prefix (llama.cpp's Gemma
    converter sets add_space_prefix false), BOS added, <end_of_turn> the eot id."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("gemma")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() + ["héllo wörld ✓ 日本\n"]),
        model_prefix=str(folder / "sp"), vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types, scores = [3, 3, 3, 2, 3, 3], [0.0] * 6
    for i in range(sp.vocab_size()):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            tokens.append(sp.id_to_piece(i))
            types.append(6 if sp.is_byte(i) else 1)
            scores.append(sp.get_score(i))
    path = write_vocab_gguf(folder / "gemma.gguf", "llama", tokens, types, scores=scores,
                            arch="gemma3", bos=2, eos=1, unk=3, eot=5, add_bos=True,
                            add_eos=False, space_prefix=False, template=GEMMA_TEMPLATE)
    return path, tokens, types, scores


def test_gemma_vocabulary_matches_transformers(gemma) -> None:
    path, tokens = gemma[:2]
    _check_against_transformers(path, _transformers(path), "<end_of_turn>")
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.encode("hi", bos=True)[0] == 2  # add_bos true
    assert encode_template_dialog(tok, DIALOG)[:2] == [2, 4]  # <bos><start_of_turn>, once
    assert tok.stop_ids == {1, 5}  # <eos> and <end_of_turn>, which --until-eos stops at
    assert tok.template_tokens() == {"bos_token": "<bos>", "eos_token": "<eos>"}


def test_gemma_whitespace_runs_are_matched_whole_as_llama_cpp_does(gemma) -> None:
    """Gemma's converter stores its whitespace-run tokens as user-defined with real spaces;
    llama.cpp matches them in the raw text before spaces become U+2581, longest first
    (transformers' GGUF conversion merges them as U+2581 runs instead: "  two" differs)."""
    path, tokens, types, scores = gemma
    runs = ["  ", "   ", "\n\n"]
    path = write_vocab_gguf(path.with_name("runs.gguf"), "llama", tokens + runs,
                            types + [4] * len(runs), scores=scores + [0.0] * len(runs),
                            arch="gemma3", bos=2, eos=1, unk=3, space_prefix=False)
    tok = load_tokenizer(path)
    two, three, lines = (len(tokens) + i for i in range(3))
    ids = tok.encode("a    b\n\n\n  c")
    assert ids.count(three) == 1 and ids.count(two) == 1 and ids.count(lines) == 1
    assert ids[ids.index(three) + 1] == tokens.index("\u2581")  # the fourth space alone
    assert tok.decode(ids) == "a    b\n\n\n  c"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3's layout: byte-level BPE, pre-tokenizer "qwen2", <|endoftext|> <|im_start|>
    <|im_end|> control tokens after the merged ones, <think> </think> user-defined; EOS is
    <|im_end|> in an instruct file, and no BOS is added."""
    folder = tmp_path_factory.mktemp("qwen3")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    # Trained on whole lines, so merges cross every place the "qwen2" split cuts (digits one by
    # one, newline runs, punctuation before a word): a wrong split gives other ids.
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    lines = _corpus(200) + [f"x {n} {n * 7},hello\n\n\nDON'T\tok." for n in range(100, 400)]
    trained.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained.add_special_tokens(specials)
    trained.save(str(folder / "tokenizer.json"))
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    vocab = trained.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t.startswith("<|") else 4 if t in specials else 1 for t in tokens]
    path = write_vocab_gguf(folder / "qwen3.gguf", "gpt2", tokens, types, merges=merges,
                            pre="qwen2", arch="qwen3", bos=tokens.index("<|endoftext|>"),
                            eos=tokens.index("<|im_end|>"), add_bos=False,
                            template=QWEN3_TEMPLATE)
    return path, tokens, types, merges


def test_qwen3_vocabulary_matches_transformers(qwen3) -> None:
    path, tokens, types, merges = qwen3
    _check_against_transformers(path, _transformers(path), "<|im_end|>")
    tok = load_tokenizer(path)
    im_end = tokens.index("<|im_end|>")
    assert tok.eos_id == im_end
    assert tok.encode("hi", bos=True) == tok.encode("hi")  # add_bos false
    assert tok.stop_ids == {im_end}  # --until-eos stops at the end of the turn
    base = write_vocab_gguf(path.with_name("base.gguf"), "gpt2", tokens, types, merges=merges,
                            pre="qwen2", arch="qwen3", eos=tokens.index("<|endoftext|>"),
                            add_bos=False, template=QWEN3_TEMPLATE)
    # A base model's file ends text with <|endoftext|>; a chat still ends at <|im_end|>.
    assert load_tokenizer(base).stop_ids == {tokens.index("<|endoftext|>"), im_end}
    # User-defined tokens are whole in a prompt too (llama.cpp matches them always).
    for think in (tok.encode_with_specials("<think>\nx</think>"), tok.encode("<think>\nx</think>")):
        assert think[0] == tokens.index("<think>") and think[-1] == tokens.index("</think>")


def test_unsupported_vocabulary_kind_is_one_error_line(qwen3, tmp_path) -> None:
    tokens = qwen3[1]
    path = write_vocab_gguf(tmp_path / "rwkv.gguf", "rwkv", tokens, [1] * len(tokens))
    with pytest.raises(InfermeterError) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)
    assert "GGUF tokenizer kind 'rwkv' is not supported" in str(err.value)
