"""Tensor names of a checkpoint format <-> the engine's (Meta's) names, from two tables: the
model-wide tensors, and a layer's modules under a per-layer prefix. HF safetensors and GGUF files
differ only in their tables and prefixes (hf.py, gguf.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NameMap:
    top: dict[str, str]  # the format's whole-model names -> Meta's ("token_embd.weight" -> ...)
    layer: dict[str, str]  # a layer's module, the format's -> Meta's ("attn_q" -> "attention.wq")
    prefix: str  # what goes before the layer index: "model.layers." or "blk."
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pattern = re.compile(rf"^{re.escape(self.prefix)}(\d+)\.(.+)\.(weight|bias)$")
        object.__setattr__(self, "_pattern", pattern)

    def to_meta(self, name: str) -> str | None:
        """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight'; None for other names."""
        if name in self.top:
            return self.top[name]
        match = self._pattern.match(name)
        if match and match.group(2) in self.layer:
            return f"layers.{match.group(1)}.{self.layer[match.group(2)]}.{match.group(3)}"
        return None

    def from_meta(self, name: str) -> str:
        """'layers.3.attention.wq.weight' -> the format's name for it."""
        for theirs, meta in self.top.items():
            if name == meta:
                return theirs
        layer, rest = name.removeprefix("layers.").split(".", 1)
        module, kind = rest.rsplit(".", 1)
        theirs = {meta: own for own, meta in self.layer.items()}[module]
        return f"{self.prefix}{layer}.{theirs}.{kind}"
