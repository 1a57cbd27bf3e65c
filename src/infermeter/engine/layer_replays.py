"""The exact-length compiled prefill's layers, each replayed as a CUDA graph.

The exact prefill (prompts at their own length: `--prefill exact`, and every prefill of
`infermeter offload`, whose layer-wise reload waits between layers) runs one compiled layer
function from the model's Python loop. Without a graph, every layer costs the host its guard
check and a Python launch per kernel: on an H100 an 80-token Llama-2-7B prefill took 27.7 ms
that way against 7.0 ms recorded whole (results/ttft-nvidia-h100-80gb-hbm3-summary.txt),
so a prefill measured that way measured the host. Here each layer's call is recorded once
per (layer, length, start) by recorded_forward.RecordedForwards and replayed after, still one
call a layer from the loop, so a wait can still sit between two layers.

Buffers, not copies: per shape two activation buffers [B, T, dim] serve every layer in turn
(layer i reads one and writes the other, so layer i + 1 reads what layer i wrote, in place),
and one set of RoPE rows and positions, filled before each replay (a local-RoPE layer's rows
differ from a global one's). The buffers are kept for as long as this object: the graphs read
them at their addresses. A forward's output is the last layer's buffer, read before the next
forward starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.recorded_forward import RecordedForwards

# (h [B, T, dim] in, h out, cos, sin [T, head_dim / 2], positions [T])
Buffers = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class LayerReplays:
    """wrap(compiled, layers) -> a block_fn for Transformer.forward whose every layer call is
    a recorded graph's replay (on CUDA; elsewhere the same calls, run)."""

    def __init__(self, device: torch.device) -> None:
        self.recorded = RecordedForwards(device)
        self._buffers: dict[tuple[Any, ...], Buffers] = {}

    def follow(self, state: Any) -> None:
        """The model's buffers' state (Generator._buffers_state): graphs are kept per state."""
        self.recorded.follow(state)

    def _buffers_for(self, h: Tensor, cos: Tensor, positions: Tensor) -> Buffers:
        shape = (tuple(h.shape), h.dtype, tuple(cos.shape), cos.dtype, tuple(positions.shape))
        if shape not in self._buffers:
            self._buffers[shape] = (torch.empty_like(h), torch.empty_like(h),
                                    torch.empty_like(cos), torch.empty_like(cos),
                                    torch.empty_like(positions))
        return self._buffers[shape]

    def wrap(self, compiled: Callable[..., Tensor], layers: Any) -> Callable[..., Tensor]:
        """compiled(layer, h, cos, sin, positions) -> h': the function every layer runs."""
        index = {id(layer): i for i, layer in enumerate(layers)}

        def run(layer: Any, h: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                blocks: Any = None) -> Tensor:
            if blocks is not None:  # flex tile lists: the bucketed prefill's, not recorded here
                return compiled(layer, h, cos, sin, positions, blocks)
            i = index[id(layer)]
            first, second, cos_in, sin_in, positions_in = self._buffers_for(h, cos, positions)
            source, target = (first, second) if i % 2 == 0 else (second, first)
            if h is not source:  # layer 0's input (the embeddings); later ones read in place
                source.copy_(h)
            cos_in.copy_(cos)
            sin_in.copy_(sin)
            positions_in.copy_(positions)

            def forward(x: Tensor, c: Tensor, s: Tensor, p: Tensor) -> Tensor:
                return target.copy_(compiled(layer, x, c, s, p))

            # the start a layer's attention was told (model.prefill_from): another graph each
            key = (i, tuple(h.shape), layer.attention.prefill_start)
            return self.recorded.run(key, forward, (source, cos_in, sin_in, positions_in),
                                     persistent=True)

        return run
