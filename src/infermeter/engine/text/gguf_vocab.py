"""The tokenizer inside a GGUF file (tokenizer.ggml.*), rebuilt as a `tokenizers` object the way
llama.cpp reads it.

Two kinds (tokenizer.ggml.model):
  "llama"  SentencePiece BPE (Llama 2, Mistral, Gemma 2/3): pieces spell spaces as U+2581 and
           carry scores; the merges are every pair of pieces that makes a longer piece, the
           better-scored piece first (sentencepiece's BPE order); bytes outside the vocabulary
           fall back to <0xNN> pieces. add_space_prefix (default on) puts a space before the
           text, and after each control token, as llama.cpp does (Gemma's files set it false).
  "gpt2"   byte-level BPE (Llama 3, Qwen2/Qwen3, SmolLM2, gpt-oss): tokens in GPT-2's byte
           alphabet, merges from the file, the text first split by the regexes of the
           pre-tokenizer that tokenizer.ggml.pre names (llama.cpp's table, for the names
           below); decoding works for any name, encoding with an unknown one is an error line
           naming it.
Control tokens (token type 3) and user-defined ones (4) become added tokens: control tokens whole
in a rendered chat template, plain text in a prompt (tokenizer.py's rule); user-defined ones
(Qwen3's <think>) whole in both, as llama.cpp matches them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.specs.gguf_meta import field as meta_field
from infermeter.specs.gguf_meta import open_gguf

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp's token types

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (  # tokenizer.LLAMA3_PAT_STR (a test keeps the two equal)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k_base's pattern (tiktoken; gpt-oss): a word is an optional non-letter, then upper-case
# letters before lower-case ones (or the other way), marks counted as letters, an optional
# contraction of any case; digits in threes; punctuation keeps trailing newlines and slashes.
_GPT4O = "|".join((
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"))
# tokenizer.ggml.pre -> the regexes llama.cpp splits the text with, one after the other
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,), "dbrx": (_LLAMA3,), "falcon3": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
    "gpt-4o": (_GPT4O,),
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}


@dataclass
class GGUFVocab:
    backend: Any  # tokenizers.Tokenizer
    size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: set[int]
    special: dict[str, int]  # control and user-defined token text -> id
    add_bos: bool
    chat_template: str | None = None
    encode_error: str | None = None  # why this vocabulary cannot encode (decoding still works)
    kind: str = "gpt2"  # tokenizer.ggml.model


def _tokenizers() -> Any:
    try:
        return importlib.import_module("tokenizers")
    except ImportError:
        raise InfermeterError("the 'tokenizers' package is needed for a GGUF file's tokenizer: "
                              "pip install 'infermeter[tokenizers]'") from None


def has_vocab(path: Path) -> bool:
    return open_gguf(path).fields.get("tokenizer.ggml.tokens") is not None


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE's merges, from its pieces: each normal piece that is two normal pieces
    joined, ordered by the joined piece's score (higher first), ties as transformers breaks them
    (shorter left piece first, then by ids)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, index in ids.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        found += [(scores[index], left, right) for left, right in local]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _token_id(reader: Any, key: str, size: int) -> int | None:
    value = meta_field(reader, f"tokenizer.ggml.{key}")
    return int(value) if isinstance(value, int) and 0 <= value < size else None


def read_gguf_vocab(path: Path) -> GGUFVocab:
    reader = open_gguf(path)
    tokens = meta_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise InfermeterError(f"{path}: this GGUF carries no tokenizer (tokenizer.ggml.tokens); "
                              "give --tokenizer-path or use --prompt-ids")
    kind = meta_field(reader, "tokenizer.ggml.model")
    types = meta_field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    tk = _tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    error = None
    pre = meta_field(reader, "tokenizer.ggml.pre")
    if kind == "llama":
        scores = meta_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = meta_field(reader, "tokenizer.ggml.merges")
        merges = ([tuple(m.split(" ", 1)) for m in merges] if merges
                  else spm_merges(tokens, scores, types))
        unk = _token_id(reader, "unknown_token_id", len(tokens))
        backend = tk.Tokenizer(models.BPE(
            {t: i for i, t in enumerate(tokens)}, merges, fuse_unk=True, byte_fallback=True,
            unk_token=tokens[unk] if unk is not None else None))
        prefix = meta_field(reader, "tokenizer.ggml.add_space_prefix", True)
        # Spaces become U+2581, the text one word; the prefix space always (also before a text
        # that starts with one, which tokenizers' Metaspace would skip), and after each control
        # token: normalizers run on each piece between added tokens.
        spaces = [normalizers.Replace(" ", "\u2581")]
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), *spaces] if prefix else spaces)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix
                                                     else []))
        add_bos_default = True
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta_field(reader, "tokenizer.ggml.merges", [])]
        backend = tk.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                          ignore_merges=pre in _IGNORE_MERGES))
        if pre in PRE_TOKENIZERS:
            splits = [pre_tokenizers.Split(tk.Regex(p), behavior="isolated")
                      for p in PRE_TOKENIZERS[pre]]
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            error = (f"{path}: GGUF pre-tokenizer {pre!r} is not one infermeter knows "
                     f"({', '.join(PRE_TOKENIZERS)}): give the model's tokenizer.json with "
                     "--tokenizer-path, or use --prompt-ids")
        backend.decoder = decoders.ByteLevel()
        add_bos_default = pre in _IGNORE_MERGES  # Llama 3 starts with <|begin_of_text|>
    else:
        raise InfermeterError(f"{path}: GGUF tokenizer kind {kind!r} is not supported (llama, "
                              "gpt2); give --tokenizer-path or use --prompt-ids")
    special = {}
    for index, (token, kind_id) in enumerate(zip(tokens, types)):
        if kind_id in (CONTROL, USER_DEFINED) and backend.token_to_id(token) == index:
            special[token] = index
    backend.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t, i in special.items() if types[i] == CONTROL])
    backend.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                        for t, i in special.items() if types[i] == USER_DEFINED])
    backend.encode_special_tokens = True  # prompts are plain text (tokenizer.py)
    size = len(tokens)
    bos, eos = _token_id(reader, "bos_token_id", size), _token_id(reader, "eos_token_id", size)
    stops = {i for i in (eos, _token_id(reader, "eot_token_id", size),
                         _token_id(reader, "eom_token_id", size)) if i is not None}
    template = meta_field(reader, "tokenizer.chat_template")
    return GGUFVocab(backend, size, bos, eos, stops, special,
                     bool(meta_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
                     template if isinstance(template, str) and template.strip() else None,
                     error, kind)
