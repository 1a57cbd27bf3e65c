"""A checkpoint's own chat template (Jinja), rendered as transformers' apply_chat_template does.

HF folders ship it as tokenizer_config.json's "chat_template" (or a chat_template.jinja file),
GGUF files as tokenizer.chat_template. transformers renders it in a sandboxed, immutable Jinja
environment with trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that does not escape
HTML, `strftime_now`, loop controls and the `{% generation %}` tag, and passes messages, tools
(None), documents (None), add_generation_prompt and the tokenizer's special tokens (bos_token,
eos_token, ...). The same here, so the same dialog renders to the same text. jinja2 is imported on
first use: only templated chats need it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from infermeter.errors import InfermeterError

# A stand-in assistant answer, found again in the rendered text to see what follows a turn.
_PROBE = "infermeter-probe-answer"


def _jinja() -> Any:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise InfermeterError("the model's chat template needs jinja2: "
                              "pip install jinja2") from None
    return jinja2


@lru_cache(maxsize=8)
def compile_template(template: str) -> Any:
    """The compiled template; a syntax error is one error line."""
    jinja2 = _jinja()

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks an assistant's text for training
        masks; rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise InfermeterError(f"chat template: syntax error on line {err.lineno}: "
                              f"{err.message}") from None


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    """The dialog as the template writes it; special_tokens: {"bos_token": "<s>", ...}.

    An error the template raises (raise_exception, e.g. roles that do not alternate) is one
    error line.
    """
    jinja2 = _jinja()
    try:
        return compile_template(template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise InfermeterError(f"chat template: {err}") from None


def text_after_answer(template: str, special_tokens: dict[str, str]) -> str | None:
    """What the template writes right after an assistant's answer (ChatML: "<|im_end|>\\n",
    Llama 3: "<|eot_id|>"): its first token is the one that ends the model's turn. None when the
    template refuses the probe dialog or drops the answer."""
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(template, dialog, special_tokens, add_generation_prompt=False)
    except InfermeterError:
        return None
    at = text.rfind(_PROBE)
    return None if at < 0 else text[at + len(_PROBE):]
