"""Tokenizers: sentencepiece (Llama 2), tiktoken-format BPE (Llama 3), HF tokenizer.json, and the
vocabulary inside a GGUF file (engine/text/gguf_vocab.py builds it).

All of them share one small interface (`Tokenizer`) so the engine and benchmarks never care which
one a model uses. `encode` treats its text as plain text: a prompt that contains "<|eot_id|>" or
"</s>" gets the tokens of those characters, never the control id (as Meta's reference code does).
Control ids are placed on purpose by the chat formats through `special_id`.

The backends (sentencepiece, tiktoken, tokenizers) are optional extras, imported only when a
tokenizer of that kind is loaded.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError

# Meta's Llama 3 pre-tokenizer split pattern (llama3/tokenizer.py).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
) + tuple(f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5))

# Tokens that end a turn in common HF chat models; added to stop_ids when the vocab has them.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
# Best-effort BOS / EOS names for HF folders that ship no tokenizer_config.json.
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


class Tokenizer:
    """Text <-> token ids, with the ids that start and end a sequence.

    `bos_id` / `eos_id` are None only for HF tokenizers that define no such token; `encode`
    then silently adds nothing for `bos=True` / `eos=True`.
    """

    def __init__(
        self,
        vocab_size: int,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: set[int],
        special_tokens: dict[str, int],
    ) -> None:
        self._vocab_size = vocab_size
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._stop_ids = frozenset(stop_ids)
        self._special_tokens = dict(special_tokens)

    # The Jinja chat template the tokenizer's files ship, or None (engine/text/template.py).
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation (Llama 3: <|end_of_text|> and <|eot_id|>)."""
        return self._stop_ids

    def special_id(self, token: str) -> int | None:
        """Id of a control token such as "<|eot_id|>", or None if this vocab lacks it."""
        return self._special_tokens.get(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """Control token text -> id (a copy)."""
        return dict(self._special_tokens)

    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template reads ({"bos_token": "<s>", ...}), those it has."""
        names = {i: text for text, i in self._special_tokens.items()}
        pairs = (("bos_token", self.bos_id), ("eos_token", self.eos_id))
        return {key: names[i] for key, i in pairs if i in names}

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a text whose control tokens stand for themselves (a rendered chat template)."""
        raise InfermeterError(f"{type(self).__name__} cannot read control tokens inside a text, "
                              "which the model's chat template needs")

    def _add_template_stops(self) -> None:
        """Stop at the control token the chat template writes after an assistant's answer too
        (ChatML's <|im_end|>, Llama 3's <|eot_id|>)."""
        if not self.chat_template:
            return
        from infermeter.engine.text.template import text_after_answer

        after = (text_after_answer(self.chat_template, self.template_tokens()) or "").lstrip()
        ends = [t for t in self._special_tokens if t and after.startswith(t)]
        if ends:
            self._stop_ids |= {self._special_tokens[max(ends, key=len)]}


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InfermeterError(
            f"the '{module}' package is needed for this tokenizer: "
            "pip install 'infermeter[tokenizers]'"
        ) from None


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's tokenizer.model (a sentencepiece protobuf), as Meta's llama/tokenizer.py."""

    def __init__(self, path: str | Path) -> None:
        spm = _import("sentencepiece")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise InfermeterError(
                f"{path}: not a sentencepiece model or tiktoken BPE file ({e})"
            ) from None
        sp = self._sp
        # sentencepiece reports a disabled bos/eos as -1.
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
        special = {sp.id_to_piece(i): i for i in (bos, eos) if i is not None}
        super().__init__(sp.vocab_size(), bos, eos, {eos} if eos is not None else set(), special)

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def read_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` per line, ranks 0..n-1.

    Parsed here rather than with tiktoken.load, which caches files under the temp dir.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise InfermeterError(
                    f"{path}:{lineno}: not a tiktoken BPE line (want 'base64token rank')"
                ) from None
    # Special tokens are numbered from len(ranks): holes or duplicates would collide with them.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InfermeterError(f"{path}: tiktoken ranks must be 0..{len(ranks) - 1}, each once")
    # tiktoken panics on bytes it cannot encode, so every single byte must be a token.
    if any(bytes([b]) not in ranks for b in range(256)):
        raise InfermeterError(f"{path}: tiktoken BPE lacks some of the 256 single-byte tokens")
    return ranks


def _split_long_runs(s: str, max_run: int = 25_000) -> Iterator[str]:
    """Cut runs of > max_run whitespace or non-whitespace chars (Meta: avoids a regex overflow)."""
    if len(s) <= max_run:  # no run can be longer than the string: the common, fast case
        yield s
        return
    run_len, run_is_space, start = 0, s[0].isspace(), 0
    for i, ch in enumerate(s):
        if ch.isspace() != run_is_space:
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tokenizer.model (tiktoken BPE) + Meta's 256 special tokens after the base vocab."""

    _MAX_ENCODE_CHARS = 400_000  # Meta's TIKTOKEN_MAX_ENCODE_CHARS

    def __init__(self, path: str | Path) -> None:
        tiktoken = _import("tiktoken")
        ranks = read_tiktoken_bpe(path)
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._model = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special,
        )
        bos, eos = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        # Meta's stop_tokens: end of text, and end of a chat turn.
        super().__init__(self._model.n_vocab, bos, eos, {eos, special["<|eot_id|>"]}, special)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), self._MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + self._MAX_ENCODE_CHARS]):
                ids.extend(self._model.encode_ordinary(piece))  # specials as plain text
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(list(ids))

    def encode_with_specials(self, text: str) -> list[int]:
        return list(self._model.encode(text, allowed_special="all"))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a side file, or {} if absent; bad JSON is the user's to fix."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InfermeterError(f"{path}: unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a token as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, with BOS/EOS from the JSON side files next to it.

    Only JSON is read from the folder; no code in it is ever imported or run.
    """

    def __init__(self, path: str | Path) -> None:
        tokenizers = _import("tokenizers")
        path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise InfermeterError(f"{path}: not a tokenizer.json ({e})") from None
        if hasattr(self._tok, "encode_special_tokens"):  # tokenizers >= 0.15: specials as text
            self._tok.encode_special_tokens = True
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        bos, eos, stop = self._find_bos_eos(path.parent)
        stop |= {special[t] for t in _END_OF_TURN_TOKENS if t in special}
        super().__init__(self._tok.get_vocab_size(with_added_tokens=True), bos, eos, stop, special)
        self.chat_template = _chat_template(path.parent)
        self._add_template_stops()

    def _find_bos_eos(self, folder: Path) -> tuple[int | None, int | None, set[int]]:
        """BOS/EOS ids from tokenizer_config.json, special_tokens_map.json, config files, names."""
        tok_config = _read_json(folder / "special_tokens_map.json")
        tok_config.update(_read_json(folder / "tokenizer_config.json"))
        gen_config = _read_json(folder / "config.json")
        gen_config.update(_read_json(folder / "generation_config.json"))

        def lookup(key: str, guesses: tuple[str, ...]) -> int | None:
            name = _token_content(tok_config.get(key))
            if name is not None and self._tok.token_to_id(name) is not None:
                return self._tok.token_to_id(name)
            config_id = gen_config.get(f"{key}_id")
            if isinstance(config_id, list) and config_id:  # e.g. Llama 3 instruct: [128001, 128009]
                config_id = config_id[0]
            if isinstance(config_id, int):
                return config_id
            guessed = (self._tok.token_to_id(g) for g in guesses)
            return next((i for i in guessed if i is not None), None)

        bos, eos = lookup("bos_token", _BOS_GUESSES), lookup("eos_token", _EOS_GUESSES)
        config_eos = gen_config.get("eos_token_id")  # every listed eos id stops generation
        config_eos = config_eos if isinstance(config_eos, list) else [config_eos]
        return bos, eos, {i for i in [eos, *config_eos] if isinstance(i, int)}

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_with_specials(self, text: str) -> list[int]:
        return encode_parsing_specials(self._tok, text)


def encode_parsing_specials(tok: Any, text: str) -> list[int]:
    """A `tokenizers` Tokenizer's ids for text, its added tokens matched whole (as transformers
    tokenizes a rendered chat template); the tokenizer's text-only setting is kept."""
    plain = getattr(tok, "encode_special_tokens", False)
    tok.encode_special_tokens = False
    try:
        return list(tok.encode(text, add_special_tokens=False).ids)
    finally:
        tok.encode_special_tokens = plain


def _chat_template(folder: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    named templates: "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InfermeterError(f"{jinja_file}: unreadable ({e})") from None
    found = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default", next(iter(named.values()), None))
    return found if isinstance(found, str) and found.strip() else None


class GGUFTokenizer(Tokenizer):
    """The vocabulary a GGUF file carries (tokenizer.ggml.*), built by gguf_vocab.py the way
    llama.cpp reads it, with the file's chat template. A prompt's BOS follows the file's
    add_bos_token (SmolLM2: none)."""

    def __init__(self, path: str | Path) -> None:
        from infermeter.engine.text.gguf_vocab import read_gguf_vocab

        vocab = read_gguf_vocab(Path(path))
        self._tok, self._add_bos, self._encode_error = (vocab.backend, vocab.add_bos,
                                                        vocab.encode_error)
        stop = set(vocab.stop_ids) | {vocab.special[t] for t in _END_OF_TURN_TOKENS
                                      if t in vocab.special}
        super().__init__(vocab.size, vocab.bos_id, vocab.eos_id, stop, vocab.special)
        self.chat_template = vocab.chat_template
        self._add_template_stops()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return super().encode(text, bos=bos and self._add_bos, eos=eos)

    def _encode(self, text: str) -> list[int]:
        if self._encode_error:
            raise InfermeterError(self._encode_error)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_with_specials(self, text: str) -> list[int]:
        if self._encode_error:
            raise InfermeterError(self._encode_error)
        return encode_parsing_specials(self._tok, text)


def _is_tiktoken_file(path: Path) -> bool:
    """A tiktoken BPE file starts with a `base64 rank` text line; a protobuf never does."""
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_TIKTOKEN_LINE.match(first.rstrip(b"\n")))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in `path`: a tokenizer.json / tokenizer.model file or their folder, or
    a GGUF file's vocabulary.

    A folder's tokenizer.json wins (HF); else tokenizer.model (also Meta's HF `original/`),
    read as tiktoken if its first line is `base64 rank`, else as sentencepiece.
    """
    from infermeter.specs.gguf_meta import is_gguf

    path = Path(path)
    if is_gguf(path):
        return GGUFTokenizer(path)
    if path.is_dir():
        candidates = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
        found = next((path / c for c in candidates if (path / c).is_file()), None)
        if found is None:
            raise InfermeterError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        path = found
    elif not path.is_file():
        raise InfermeterError(f"{path}: tokenizer file not found")
    if path.suffix == ".json":
        return HFTokenizer(path)
    try:
        is_tiktoken = _is_tiktoken_file(path)
    except OSError as e:
        raise InfermeterError(f"{path}: cannot read tokenizer ({e.strerror})") from None
    return TiktokenTokenizer(path) if is_tiktoken else SentencePieceTokenizer(path)


def gguf_tokenizer(path: str | Path) -> Tokenizer | None:
    """A GGUF file's tokenizer, or None when the file carries no vocabulary."""
    from infermeter.engine.text.gguf_vocab import has_vocab

    return GGUFTokenizer(path) if has_vocab(Path(path)) else None
