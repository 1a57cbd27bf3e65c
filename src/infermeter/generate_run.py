"""`infermeter generate`: a checkpoint (or random weights) + prompts -> generated tokens -> Result.

This is the correctness view of the engine: what it generates, not how fast (the timed version
is bench/generation.py). Prompts come as text (encoded with the checkpoint's tokenizer), as
chat dialogs (Llama-2-chat / Llama-3 formats, as Meta's example_chat_completion.py), or as raw
token ids. Prompts of different lengths run as separate batches, one per length, because the
engine's batch shares positions (no padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.results import Result

DEFAULT_PROMPT_IDS = [1, 450, 4996, 17354, 1701, 29916]  # a fixed prompt for tokenizer-less runs


@dataclass(frozen=True)
class GenerateRequest:
    source: str  # checkpoint folder or "random:<model>"
    tokenizer_path: str | None
    prompts: tuple[str, ...]
    prompt_ids: tuple[str, ...]
    dialogs_path: str | None
    chat_format: str
    max_new_tokens: int
    greedy: bool
    temperature: float
    top_p: float
    seed: int
    until_eos: bool
    device: str
    dtype: str | None
    kv_dtype: str | None
    mode: str  # "eager" | "compiled"
    max_seq_len: int | None
    max_batch_size: int | None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_tokenizer(request: GenerateRequest) -> Any:
    """The tokenizer named by --tokenizer-path, else the one beside the checkpoint, else None."""
    from infermeter.engine.tokenizer import load_tokenizer

    if request.tokenizer_path:
        return load_tokenizer(request.tokenizer_path)
    if request.source.startswith("random:"):
        return None
    folder = Path(request.source).expanduser()
    for candidate in (folder, folder.parent):  # Meta downloads keep tokenizer.model one up
        if any((candidate / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            return load_tokenizer(candidate)
    return None


def build_prompts(request: GenerateRequest, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    from infermeter.engine.chat import encode_dialog, load_dialogs, parse_prompt_ids

    prompts = [parse_prompt_ids(text, vocab_size) for text in request.prompt_ids]
    needs_tokenizer = request.prompts or request.dialogs_path
    if needs_tokenizer and tokenizer is None:
        raise InfermeterError("text prompts and dialogs need a tokenizer: give --tokenizer-path "
                              "(or use --prompt-ids)")
    prompts += [tokenizer.encode(text, bos=True) for text in request.prompts]
    if request.dialogs_path:
        prompts += [encode_dialog(tokenizer, dialog, request.chat_format)
                    for dialog in load_dialogs(request.dialogs_path)]
    return prompts or [[i % vocab_size for i in DEFAULT_PROMPT_IDS]]


def _batches(prompts: list[list[int]], max_batch: int) -> list[list[int]]:
    """Indices of prompts grouped by length, each group split to at most max_batch."""
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    groups = []
    for indices in by_length.values():
        groups += [indices[i:i + max_batch] for i in range(0, len(indices), max_batch)]
    return groups


def run_generate(request: GenerateRequest, env: dict[str, Any]) -> tuple[Result, list[str]]:
    """Load, generate every prompt, and return the Result plus the decoded texts (or '')."""
    import torch

    from infermeter.engine.checkpoint import load_weights
    from infermeter.engine.generate import GenerationConfig, Generator
    from infermeter.engine.model import dtype_name

    device = request.device
    if device == "cuda" and not torch.cuda.is_available():
        raise InfermeterError("--device cuda asked for, but no CUDA GPU is visible")
    dtype = request.dtype or ("float32" if device == "cpu" else "bfloat16")
    model = load_weights(request.source, device, dtype, seed=request.seed)
    tokenizer = find_tokenizer(request)
    prompts = build_prompts(request, tokenizer, model.spec.vocab_size)
    max_batch = request.max_batch_size or len(prompts)
    stop_ids = frozenset(tokenizer.stop_ids) if (request.until_eos and tokenizer) else frozenset()
    config = GenerationConfig(max_new_tokens=request.max_new_tokens, greedy=request.greedy,
                              temperature=request.temperature, top_p=request.top_p,
                              stop_ids=stop_ids, seed=request.seed,
                              compile=request.mode == "compiled")
    generator = Generator(model, request.max_seq_len, kv_dtype=request.kv_dtype)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for group in _batches(prompts, max_batch):
        out = generator.generate([prompts[i] for i in group], config)
        for i, ids, done in zip(group, out.output_token_ids, out.finished):
            outputs[i], finished[i] = ids, done
    texts = [tokenizer.decode(ids) if tokenizer else "" for ids in outputs]
    warnings = []
    if request.until_eos and tokenizer is None:
        warnings.append("--until-eos without a tokenizer: no stop ids known, ran fixed length")
    config_out = {"source": request.source, "device": device, "dtype": dtype_name(
        model.tok_embeddings.weight.dtype), "kv_dtype": request.kv_dtype or dtype,
        "mode": request.mode, "max_new_tokens": request.max_new_tokens,
        "greedy": request.greedy, "temperature": request.temperature, "top_p": request.top_p,
        "seed": request.seed, "until_eos": request.until_eos, "batch_size": len(prompts),
        "prompt_lengths": [len(p) for p in prompts]}
    metrics = {"prompt_tokens": sum(len(p) for p in prompts),
               "total_tokens": sum(len(o) for o in outputs), "finished": finished}
    result = Result("generate", model.spec.to_dict(), config_out, env, metrics,
                    warnings=warnings, output_token_ids=outputs)
    return result, texts
