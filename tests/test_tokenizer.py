"""Tokenizers and chat formats, on tiny tokenizers built inside the tests (no downloads)."""

from __future__ import annotations

import base64
import json
import random
import sys
from pathlib import Path

import pytest

from infermeter.engine.text.chat import (
    encode_dialog,
    encode_llama2_dialog,
    encode_llama3_dialog,
    load_dialogs,
    parse_prompt_ids,
    resolve_chat_format,
)
from infermeter.engine.text.tokenizer import (
    LLAMA3_PAT_STR,
    LLAMA3_SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    read_tiktoken_bpe,
)
from infermeter.errors import InfermeterError

# The chat template of Meta-Llama-3-8B-Instruct's tokenizer_config.json, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

DIALOG = [
    {"role": "system", "content": "Always answer with Haiku."},
    {"role": "user", "content": "I am going to Paris, what should I see?"},
    {"role": "assistant", "content": " Paris, the capital of France, is known for its art.\n"},
    {"role": "user", "content": "What is so great about #1?  "},
]
TEXTS = [
    "hello world",
    "Hello, World! 123 4567",
    "  tabs\tand\nnew lines\n\n",
    "héllo wörld ✓ 日本",
]


def _corpus(n_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "ve", "du", "the", "and", "ing"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(200)]
    extra = ["hello world", "Paris France art Haiku", "[INST] <<SYS>> [/INST] </s> user assistant"]
    return extra + [" ".join(rng.choices(words, k=12)) + "." for _ in range(n_lines)]


# --- fixtures: one tiny tokenizer of each kind -------------------------------------------------


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,  # Llama 2 settings: ids unk=0 bos=1 eos=2, raw whitespace
    )
    return folder / "tokenizer.model"


TIKTOKEN_MERGES = [
    b"he",
    b"ll",
    b"llo",
    b"hello",
    b" w",
    b"or",
    b" wor",
    b"ld",
    b" world",
    b"\n\n",
    b"us",
    b"er",
    b"user",
    b"ys",
    b"sys",
    b"tem",
    b"system",
]


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tiktoken")
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


def _train_hf(specials: list[str]):  # -> tokenizers.Tokenizer
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    # Llama 3's tokenizer.json layout: Meta's regex split, then byte-level symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


HF_SPECIALS = list(LLAMA3_SPECIAL_TOKENS[:10])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    _train_hf(HF_SPECIALS).save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|eot_id|>"},
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    return folder


# --- the three tokenizers ----------------------------------------------------------------------


def test_sentencepiece_round_trip_and_bos_eos(sp_path: Path) -> None:
    import sentencepiece as spm

    tok = load_tokenizer(sp_path)
    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (1, 2, {2}, 320)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text  # byte fallback covers the unseen characters
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert tok.special_id("<s>") == 1 and tok.special_id("<|start_header_id|>") is None


def test_tiktoken_round_trip_and_special_ids(tiktoken_path: Path) -> None:
    tok = load_tokenizer(tiktoken_path)
    assert isinstance(tok, TiktokenTokenizer)
    n_base = 256 + len(TIKTOKEN_MERGES)
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 and tok.vocab_size == n_base + 256
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_3|>": 5,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|reserved_special_token_4|>": 8,
        "<|eot_id|>": 9,
        "<|reserved_special_token_5|>": 10,
        "<|reserved_special_token_250|>": 255,
    }
    for name, index in expected.items():
        assert tok.special_id(name) == n_base + index, name
    assert (tok.bos_id, tok.eos_id) == (n_base, n_base + 1)
    assert tok.stop_ids == {n_base + 1, n_base + 9}
    assert tok.encode("hello world") == [
        256 + TIKTOKEN_MERGES.index(t) for t in (b"hello", b" world")
    ]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text, bos=True, eos=True) == [n_base, *tok.encode(text), n_base + 1]
    # Special-token text in a prompt stays text; the id itself decodes to the name.
    assert n_base + 9 not in tok.encode("<|eot_id|>")
    assert tok.decode([n_base + 9]) == "<|eot_id|>"


def test_tiktoken_long_runs_round_trip(tiktoken_path: Path) -> None:
    tok = load_tokenizer(tiktoken_path)
    text = "a" * 30_000 + " " * 26_000 + "b"  # runs longer than Meta's 25k split
    assert tok.decode(tok.encode(text)) == text


def test_hf_round_trip_and_side_files(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id) == (0, 9)  # from tokenizer_config.json
    assert tok.stop_ids == {1, 9}  # generation_config.json eos list, plus <|eot_id|>
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [0, *ids, 9]
    assert 9 not in tok.encode("<|eot_id|>")  # text, not the control id


def test_hf_best_effort_bos_eos_without_config(tmp_path: Path) -> None:
    _train_hf(["<unk>", "<s>", "</s>"]).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, {2})


# --- chat formats ------------------------------------------------------------------------------


def test_llama2_chat_matches_meta_template(sp_path: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tok = load_tokenizer(sp_path)
    first = (
        "[INST] <<SYS>>\nAlways answer with Haiku.\n<</SYS>>\n\n"
        "I am going to Paris, what should I see? [/INST] "
        "Paris, the capital of France, is known for its art. "
    )
    expected = [1, *sp.encode(first), 2, 1, *sp.encode("[INST] What is so great about #1? [/INST]")]
    assert encode_llama2_dialog(tok, DIALOG) == expected
    assert encode_dialog(tok, DIALOG) == expected  # auto -> llama2: no header tokens
    assert encode_dialog(tok, [{"role": "user", "content": " hi "}], "llama2") == [
        1,
        *sp.encode("[INST] hi [/INST]"),
    ]


@pytest.mark.parametrize(
    "roles",
    [
        ["user", "user"],
        ["assistant"],
        ["user", "assistant"],
        ["system"],
        ["system", "assistant"],
        ["user", "system", "user"],
    ],
)
def test_llama2_chat_rejects_bad_roles(sp_path: Path, roles: list[str]) -> None:
    dialog = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(InfermeterError, match="llama2 chat"):
        encode_llama2_dialog(load_tokenizer(sp_path), dialog)


def test_llama2_chat_rejects_injected_tags(sp_path: Path) -> None:
    with pytest.raises(InfermeterError, match="must not contain"):
        encode_llama2_dialog(load_tokenizer(sp_path), [{"role": "user", "content": "a [/INST] b"}])


def _llama3_by_hand(tok, dialog) -> list[int]:
    def sid(name: str) -> int:
        return tok.special_id(name)

    ids = [sid("<|begin_of_text|>")]
    for msg in [*dialog, {"role": "assistant", "content": None}]:
        ids += [
            sid("<|start_header_id|>"),
            *tok.encode(msg["role"]),
            sid("<|end_header_id|>"),
            *tok.encode("\n\n"),
        ]
        if msg["content"] is not None:
            ids += [*tok.encode(msg["content"].strip()), sid("<|eot_id|>")]
    return ids


def test_llama3_chat_tiktoken_matches_template(tiktoken_path: Path) -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox")
    import tiktoken

    tok = load_tokenizer(tiktoken_path)
    ids = encode_dialog(tok, DIALOG)  # auto -> llama3
    assert resolve_chat_format(tok) == "llama3"
    assert ids == _llama3_by_hand(tok, DIALOG) == encode_llama3_dialog(tok, DIALOG)
    # The official Jinja template, rendered the way transformers renders it, then tokenized
    # whole with control tokens allowed, gives the same ids.
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(LLAMA3_CHAT_TEMPLATE).render(
        messages=DIALOG, bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    enc = tiktoken.Encoding(
        name="ref",
        pat_str=LLAMA3_PAT_STR,
        mergeable_ranks=read_tiktoken_bpe(tiktoken_path),
        special_tokens={t: tok.special_id(t) for t in LLAMA3_SPECIAL_TOKENS},
    )
    assert enc.encode(text, allowed_special="all") == ids


def test_llama3_chat_hf_matches_transformers(hf_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(hf_dir)
    ids = encode_dialog(tok, DIALOG)
    assert ids == _llama3_by_hand(tok, DIALOG)
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    out = ref.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == ids


def test_chat_format_errors(sp_path: Path, tiktoken_path: Path) -> None:
    with pytest.raises(InfermeterError, match="no <\\|begin_of_text\\|>"):
        encode_dialog(load_tokenizer(sp_path), [{"role": "user", "content": "x"}], "llama3")
    tt = load_tokenizer(tiktoken_path)
    with pytest.raises(InfermeterError, match="unknown chat format"):
        encode_dialog(tt, [{"role": "user", "content": "x"}], "chatml")
    with pytest.raises(InfermeterError, match="role must be one of"):
        encode_dialog(tt, [{"role": "robot", "content": "x"}])
    for bad in ([], [{"role": "user"}], ["hi"], [{"role": "user", "content": 3}]):
        with pytest.raises(InfermeterError):
            encode_dialog(tt, bad)


# --- loading and bad input ---------------------------------------------------------------------


def test_load_tokenizer_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(InfermeterError, match="not found") as e:
        load_tokenizer(tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in str(e.value)
    with pytest.raises(InfermeterError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(2000)))
    with pytest.raises(InfermeterError, match="not a sentencepiece model or tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InfermeterError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_load_tokenizer_bad_tiktoken(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    path.write_bytes(b"\n".join(lines[:10] + [b"AAAA notanumber"]))
    with pytest.raises(InfermeterError, match=":11: not a tiktoken BPE line"):
        load_tokenizer(path)
    path.write_bytes(b"\n".join(lines[:100]))
    with pytest.raises(InfermeterError, match="single-byte"):
        load_tokenizer(path)
    path.write_bytes(b"\n".join(lines + [base64.b64encode(b"ab") + b" 300"]))
    with pytest.raises(InfermeterError, match="ranks must be"):
        load_tokenizer(path)


def test_missing_backend_is_a_clear_error(tiktoken_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(InfermeterError, match="pip install"):
        load_tokenizer(tiktoken_path)


def test_load_dialogs(tmp_path: Path) -> None:
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps([DIALOG, DIALOG[1:2]]))
    assert load_dialogs(path) == [DIALOG, DIALOG[1:2]]
    path.write_text(json.dumps(DIALOG))  # one bare dialog is accepted too
    assert load_dialogs(path) == [DIALOG]
    bad = {
        '[{"role": ': "malformed JSON",
        "{}": "list of dialogs",
        "[]": "list of dialogs",
        '[[{"role": "user"}]]': "dialog 0, message 0: 'content'",
        '[[{"role": "user", "content": "x"}], []]': "dialog 1: must be a non-empty",
        '[[{"role": "user", "content": "x"}], ["x"]]': "dialog 1, message 0",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(InfermeterError, match=message):
            load_dialogs(path)
    with pytest.raises(InfermeterError, match="not found"):
        load_dialogs(tmp_path / "missing.json")


def test_parse_prompt_ids() -> None:
    assert parse_prompt_ids("1,2,3") == [1, 2, 3]
    assert parse_prompt_ids(" 1, 2 3 ") == [1, 2, 3]
    assert parse_prompt_ids("0", vocab_size=1) == [0]
    for bad in ("", " , ", "1,x", "1,-2", "1.5", "١"):
        with pytest.raises(InfermeterError, match="prompt ids"):
            parse_prompt_ids(bad)
    with pytest.raises(InfermeterError, match="out of range"):
        parse_prompt_ids("5,10", vocab_size=10)
