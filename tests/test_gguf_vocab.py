"""A GGUF file's own tokenizer (tokenizer.ggml.*), rebuilt from its vocabulary: the
SentencePiece kind ("llama") encodes as sentencepiece does, the byte-level BPE kind ("gpt2") as
the tokenizer.json it came from; SmolLM2's real one is checked in test_trained_model.py."""

from __future__ import annotations

import json

import pytest

from infermeter.engine.text.gguf_vocab import PRE_TOKENIZERS
from infermeter.engine.text.tokenizer import LLAMA3_PAT_STR, GGUFTokenizer, load_tokenizer
from infermeter.errors import InfermeterError
from tests.gguf_files import write_vocab_gguf
from tests.test_tokenizer import TEXTS, _corpus, _train_hf

MORE = TEXTS + ["Paris France art", "  leading spaces", "[INST] <<SYS>> x", "a\n\n\nb", "123 45"]


def test_llama3_split_is_the_engine_s() -> None:
    assert PRE_TOKENIZERS["llama-bpe"] == (LLAMA3_PAT_STR,)


def _sp_kind(sp, i: int) -> int:
    """llama.cpp's token type of a sentencepiece piece."""
    return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
            else 5 if sp.is_unused(i) else 1)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spv")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(folder / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")), folder


def test_sentencepiece_kind_encodes_as_sentencepiece(sp_model) -> None:
    sp, folder = sp_model
    n = sp.vocab_size()
    path = write_vocab_gguf(folder / "sp.gguf", "llama", [sp.id_to_piece(i) for i in range(n)],
                            [_sp_kind(sp, i) for i in range(n)],
                            scores=[sp.get_score(i) for i in range(n)],
                            bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id())
    tok = load_tokenizer(path)
    assert isinstance(tok, GGUFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), n)
    for text in MORE:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.encode("hi", bos=True)[0] == sp.bos_id()  # llama files add BOS by default
    assert tok.encode("</s>") == sp.encode("</s>")  # a control token's text stays text


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpev")
    trained = _train_hf(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    trained.model.ignore_merges = True  # as Llama 3's tokenizer.json (and llama.cpp) have it
    trained.save(str(folder / "tokenizer.json"))
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    vocab = trained.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return trained, tokens, types, merges, folder


def test_byte_level_kind_encodes_as_its_tokenizer_json(bpe) -> None:
    trained, tokens, types, merges, folder = bpe
    path = write_vocab_gguf(folder / "bpe.gguf", "gpt2", tokens, types, merges=merges,
                            pre="llama-bpe", bos=0, eos=1)
    tok = load_tokenizer(path)
    trained.encode_special_tokens = True
    for text in MORE + ["<|eot_id|> as text"]:
        assert tok.encode(text) == trained.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", bos=True)[0] == 0  # llama-bpe: Llama 3 starts with BOS
    assert tok.stop_ids == {1, 2}  # EOS and the known end-of-turn name
    assert tok.encode_with_specials("<|eot_id|>x")[0] == 2


def test_unknown_pre_tokenizer_decodes_but_will_not_encode(bpe) -> None:
    _, tokens, types, merges, folder = bpe
    path = write_vocab_gguf(folder / "odd.gguf", "gpt2", tokens, types, merges=merges,
                            pre="made-up", add_bos=False)
    tok = load_tokenizer(path)
    assert tok.decode([tokens.index("h"), tokens.index("i")]) == "hi"
    with pytest.raises(InfermeterError, match="pre-tokenizer 'made-up' is not one infermeter"):
        tok.encode("hi")


def test_unsupported_kind_and_no_vocabulary(bpe) -> None:
    _, tokens, types, _, folder = bpe
    path = write_vocab_gguf(folder / "bert.gguf", "bert", tokens, types)
    with pytest.raises(InfermeterError, match="GGUF tokenizer kind 'bert' is not supported"):
        load_tokenizer(path)


# The first four the gpt-4o split cuts unlike Llama 3's (upper-case contractions, case changes
# inside a word, letters with combining marks, punctuation before a word); then digits in
# threes, slashes, newline and space runs, other scripts.
GPT4O_TEXTS = ["DON'T stop, he'S HERE'LL", "CamelCaseWORDs and iPhone",
               "nai\u0308ve e\u0301clair Ǆemal",
               "x 123 861,hello\n\n\nDON'T\tok. x 9", "12345 6789 0", "a/b//c\n/etc/",
               "  sp  \n \n x ", "héllo wörld ✓ 日本 ,word"]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes are themselves, the rest shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def test_gpt4o_split_and_ids_are_tiktoken_s(tmp_path, monkeypatch) -> None:
    """gpt-oss's files name the "gpt-4o" split (o200k_base's pattern): the pieces are those of
    `regex` with tiktoken's own pattern, and the ids tiktoken's for the same ranks."""
    regex = pytest.importorskip("regex")
    tiktoken = pytest.importorskip("tiktoken")
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    from infermeter.engine.text.gguf_vocab import read_gguf_vocab

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})  # no download
    pattern = openai_public.o200k_base()["pat_str"]
    assert PRE_TOKENIZERS["gpt-4o"] == (pattern,)
    # Trained on whole lines (no split), so merges cross every place a split cuts.
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    lines = [*_corpus(200), *GPT4O_TEXTS * 20, *(f"x {n} {n * 7},Hello\n\nDON'T/ok." for n in
                                                  range(100, 300))]
    trained.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = trained.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(m) if not isinstance(m, str) else m
              for m in json.loads(trained.to_str())["model"]["merges"]]
    path = write_vocab_gguf(tmp_path / "gpt-oss.gguf", "gpt2", tokens, [1] * len(tokens),
                            merges=merges, pre="gpt-4o", arch="gpt-oss", add_bos=False)
    backend = read_gguf_vocab(path).backend
    chars = _byte_chars()
    unbyte = {c: b for b, c in chars.items()}
    # tiktoken's ranks: each token's bytes -> its id (merged tokens come in merge order).
    ranks = {bytes(unbyte[c] for c in t): i for i, t in enumerate(tokens)}
    reference = tiktoken.Encoding("tiny-o200k", pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens={})
    tok = load_tokenizer(path)
    for text in GPT4O_TEXTS:
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        want = regex.findall(pattern, text)
        assert pieces == ["".join(chars[b] for b in w.encode()) for w in want], text
        assert tok.encode(text) == reference.encode_ordinary(text), text
        assert tok.decode(tok.encode(text)) == text
    for text in GPT4O_TEXTS[:4]:  # the texts tell the two splits apart
        assert regex.findall(LLAMA3_PAT_STR, text) != regex.findall(pattern, text), text
