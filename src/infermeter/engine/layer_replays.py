"""The exact-length compiled prefill's layers, each replayed as a CUDA graph.

The exact prefill (prompts at their own length: `--prefill exact`, and every prefill of
`infermeter offload`, whose layer-wise reload waits between layers) runs one compiled layer
function from the model's Python loop. Without a graph, every layer costs the host its guard
check and a Python launch per kernel: on an H100 an 80-token Llama-2-7B prefill took 27.7 ms
that way against 7.0 ms recorded whole (results/ttft-nvidia-h100-80gb-hbm3-summary.txt),
so a prefill measured that way measured the host. Here each layer's call is recorded once
per (layer, length, start) by recorded_forward.RecordedForwards and replayed after, still one
call a layer from the loop, so a wait can still sit between two layers.

Buffers, not copies: two activation buffers [B, T, dim] serve every layer in turn (layer i
reads one and writes the other, so layer i + 1 reads what layer i wrote, in place), and one set
of RoPE rows and positions, filled before each replay (a local-RoPE layer's rows differ from a
global one's). Every length is a view of the front of the same flat buffers, sized for the
longest forward seen: memory does not grow with the number of lengths, and a longer forward
than any before reallocates them and forgets every graph (they read the old addresses), which
are recorded again at their next first run (the fit checks count the two activation
buffers: generate/memory.py, offload/fit.py). A forward's output is the last layer's buffer,
read before the next forward starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.recorded_forward import RecordedForwards

# (h [B, T, dim] in, h out, cos, sin [T, head_dim / 2], positions [T])
Buffers = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def replays_prefill_layers(*, compiled: bool, bucketed: bool, compile_prefill: bool,
                           forward_len: int, on_gpu: bool, one_rank: bool,
                           without_sync: bool) -> bool:
    """Whether a prefill replays its layers here: the Generator's rule, which generate's fit
    check applies to count the two buffers. A compiled prefill that is not bucketed, through
    compile_prefill's layer function (forwards of more than one token), on a GPU (the graphs
    are CUDA's), one rank (tensor parallelism's all-reduces sit in the layers' hooks), and no
    host sync in a layer (moe.prefills_without_sync: every MoE block on the Triton experts)."""
    return compiled and not bucketed and compile_prefill and forward_len > 1 and on_gpu \
        and one_rank and without_sync


class LayerReplays:
    """wrap(compiled, layers) -> a block_fn for Transformer.forward whose every layer call is
    a recorded graph's replay (on CUDA; elsewhere the same calls, run)."""

    def __init__(self, device: torch.device) -> None:
        self.recorded = RecordedForwards(device)
        self._flat: tuple[Tensor, ...] = ()  # the five buffers, flat, for `_room` tokens
        self._room = 0
        self._family: tuple[Any, ...] = ()  # what the flat buffers were made for, but length
        self._views: dict[int, Buffers] = {}  # per length: the graphs read these

    def follow(self, state: Any) -> None:
        """The model's buffers' state (Generator._buffers_state): graphs are kept per state."""
        self.recorded.follow(state)

    def _buffers_for(self, h: Tensor, cos: Tensor, positions: Tensor) -> Buffers:
        """Views [B, T, dim] x 2, [T, D/2] x 2, [T] of the flat buffers, which are made anew
        (and every graph forgotten) for a longer T or another batch, width or dtype."""
        batch, length, dim = h.shape
        family = (batch, dim, h.dtype, cos.shape[1], cos.dtype, positions.dtype, h.device)
        if family != self._family or length > self._room:
            self.recorded.forget()
            self._views.clear()
            self._family, self._room = family, length
            self._flat = tuple(torch.empty(n, dtype=t.dtype, device=t.device) for n, t in (
                (batch * length * dim, h), (batch * length * dim, h),
                (length * cos.shape[1], cos), (length * cos.shape[1], cos),
                (length, positions)))
        if length not in self._views:  # the same view objects every time: the graphs' inputs
            first, second, cos_in, sin_in, positions_in = self._flat
            self._views[length] = (
                first[:batch * length * dim].view(batch, length, dim),
                second[:batch * length * dim].view(batch, length, dim),
                cos_in[:cos.numel()].view(cos.shape), sin_in[:cos.numel()].view(cos.shape),
                positions_in[:length])
        return self._views[length]

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
