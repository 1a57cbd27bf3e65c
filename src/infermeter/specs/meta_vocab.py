"""Vocabulary size of a Meta checkpoint whose params.json does not say it.

Llama 2's params.json has `"vocab_size": -1`: Meta's code took the size from the tokenizer. We
look, in order, at params.json, the tokenizer.model next to the weights (or one folder up, as
Meta's downloads lay them out), and the embedding shape in the first shard (read lazily with
mmap, so no weights are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _tokenizer_vocab(path: Path) -> int | None:
    head = path.read_bytes()[:4096]
    try:  # tiktoken format: lines of "base64 rank"; Llama 3 appends 256 special tokens
        lines = path.read_text().splitlines()
        if lines and all(len(line.split()) == 2 for line in lines[:10]):
            return len([line for line in lines if line.strip()]) + 256
    except UnicodeDecodeError:
        pass
    if head:
        try:
            import sentencepiece

            return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size())
        except (ImportError, RuntimeError, OSError):
            return None
    return None


def _shard_vocab(folder: Path) -> int | None:
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        return None
    from infermeter.specs.pth import load_pth

    # The safe loader: a shard that needs pickle code execution is refused here with its own
    # clear message, rather than showing up as "cannot tell the vocabulary size".
    state = load_pth(shards[0])
    weight = state.get("tok_embeddings.weight")
    # ParallelEmbedding splits the embedding along dim 1, so dim 0 is always the full vocab.
    return int(weight.shape[0]) if weight is not None else None


def meta_vocab_size(folder: Path, params: dict[str, Any]) -> int | None:
    vocab = params.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            size = _tokenizer_vocab(candidate)
            if size:
                return size
    return _shard_vocab(folder)
