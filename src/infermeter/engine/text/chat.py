"""Chat formats and prompt inputs: dialogs -> prompt ids, with the checkpoint's own chat template
(template.py) where its tokenizer ships one, else as Meta's reference code built them.

A dialog is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
Llama 2 follows `Llama.chat_completion` (llama/generation.py), Llama 3 follows `ChatFormat`
(llama3/tokenizer.py); both encode each piece separately, so the ids can differ from tokenizing
one rendered string, and the control tokens go in as ids, never as text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from infermeter.engine.text.template import render_chat
from infermeter.engine.text.tokenizer import Tokenizer
from infermeter.errors import InfermeterError

Message = dict[str, str]
Dialog = list[Message]

CHAT_FORMATS = ("llama2", "llama3", "auto")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_LLAMA2_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
_LLAMA3_ROLES = ("system", "user", "assistant", "ipython")  # ipython: Llama 3.1 tool output


def _check_dialog(dialog: Any, where: str = "dialog") -> Dialog:
    """The dialog itself, once it is a non-empty list of {"role": str, "content": str}."""
    if not isinstance(dialog, list) or not dialog:
        raise InfermeterError(f"{where}: must be a non-empty list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict):
            raise InfermeterError(f"{where}, message {i}: must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise InfermeterError(f"{where}, message {i}: '{key}' must be a string")
    return dialog


def encode_llama2_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Llama-2-chat: `<s>[INST] user [/INST] answer </s>` per turn, then the open user turn."""
    _check_dialog(dialog)
    # Meta's reference refuses prompts that smuggle in its own tags; we refuse them up front.
    if any(tag in msg["content"] for msg in dialog for tag in _LLAMA2_TAGS):
        raise InfermeterError(f"llama2 chat: message content must not contain {_LLAMA2_TAGS}")
    if dialog[0]["role"] == "system":  # fold the system prompt into the first user message
        if len(dialog) < 2:
            raise InfermeterError("llama2 chat: a system message must be followed by a user one")
        first = {
            "role": dialog[1]["role"],
            "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
        }
        dialog = [first] + dialog[2:]
    roles = [msg["role"] for msg in dialog]
    if roles != [("user", "assistant")[i % 2] for i in range(len(roles))]:
        raise InfermeterError(
            "llama2 chat: roles must be an optional 'system', then 'user' and 'assistant' "
            f"alternating (u/a/u/a/u...), got {roles}"
        )
    if roles[-1] != "user":
        raise InfermeterError(f"llama2 chat: last message must be from user, got {roles[-1]}")
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


def _special(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.special_id(token)
    if token_id is None:
        raise InfermeterError(f"llama3 chat: this tokenizer has no {token} token")
    return token_id


def encode_llama3_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Llama 3: `<|begin_of_text|>`, each message as header + content + `<|eot_id|>`, then the
    assistant header that asks the model to reply."""
    _check_dialog(dialog)
    for msg in dialog:
        if msg["role"] not in _LLAMA3_ROLES:
            raise InfermeterError(
                f"llama3 chat: role must be one of {_LLAMA3_ROLES}, got {msg['role']!r}"
            )
    begin, start, end, eot = (
        _special(tokenizer, t)
        for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )

    def header(role: str) -> list[int]:
        return [start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n")]

    ids = [begin]
    for msg in dialog:
        ids += header(msg["role"]) + tokenizer.encode(msg["content"].strip()) + [eot]
    return ids + header("assistant")


def encode_template_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The tokenizer's chat template rendered (with the assistant's turn opened) and tokenized
    with its control tokens whole, as transformers' apply_chat_template does. A message holding
    a control token's text is refused: one rendered string cannot keep it plain text."""
    _check_dialog(dialog)
    controls = tokenizer.special_tokens
    for i, msg in enumerate(dialog):
        found = next((t for t in controls if t and t in msg["content"]), None)
        if found is not None:
            raise InfermeterError(f"chat template: message {i} contains the control token "
                                  f"{found!r}, which the template would read as one")
    if tokenizer.chat_template is None:
        raise InfermeterError("this tokenizer ships no chat template")
    text = render_chat(tokenizer.chat_template, dialog, tokenizer.template_tokens())
    return tokenizer.encode_with_specials(text)


def resolve_chat_format(tokenizer: Tokenizer, chat_format: str = "auto") -> str:
    """ "auto" -> "template" if the tokenizer ships a chat template, else "llama3" if the vocab
    has Llama 3's header tokens, else "llama2"."""
    if chat_format not in CHAT_FORMATS:
        raise InfermeterError(f"unknown chat format {chat_format!r}; choose from {CHAT_FORMATS}")
    if chat_format == "auto" and tokenizer.chat_template:
        return "template"
    if chat_format == "auto":
        has_headers = tokenizer.special_id("<|start_header_id|>") is not None
        return "llama3" if has_headers else "llama2"
    return chat_format


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, chat_format: str = "auto") -> list[int]:
    """Prompt ids for one dialog in the given chat format ("llama2", "llama3" or "auto")."""
    resolved = resolve_chat_format(tokenizer, chat_format)
    if resolved == "template":
        return encode_template_dialog(tokenizer, dialog)
    if resolved == "llama3":
        return encode_llama3_dialog(tokenizer, dialog)
    return encode_llama2_dialog(tokenizer, dialog)


def load_dialogs(path: str | Path) -> list[Dialog]:
    """Dialogs from a JSON file: a list of dialogs, or one dialog (a list of messages)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InfermeterError(f"{path}: dialog file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InfermeterError(f"{path}: cannot read dialog file ({e})") from None
    except json.JSONDecodeError as e:
        raise InfermeterError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise InfermeterError(f"{path}: want a non-empty JSON list of dialogs")
    if isinstance(data[0], dict):  # a single dialog, not wrapped in a list
        data = [data]
    return [_check_dialog(d, f"{path}: dialog {i}") for i, d in enumerate(data)]


def parse_prompt_ids(text: str, vocab_size: int | None = None) -> list[int]:
    """Raw prompt token ids for benchmarks: "1,2,3" (commas and/or spaces) -> [1, 2, 3]."""
    fields = [f for f in re.split(r"[,\s]+", text.strip()) if f]
    if not fields:
        raise InfermeterError("prompt ids: empty; want comma-separated token ids like 1,2,3")
    bad = next((f for f in fields if not f.isdigit() or not f.isascii()), None)
    if bad is not None:
        raise InfermeterError(f"prompt ids: {bad!r} is not a non-negative integer (want 1,2,3)")
    ids = [int(f) for f in fields]
    if vocab_size is not None and max(ids) >= vocab_size:
        raise InfermeterError(f"prompt ids: {max(ids)} is out of range for vocab size {vocab_size}")
    return ids
