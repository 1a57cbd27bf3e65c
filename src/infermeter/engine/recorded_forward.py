"""A forward recorded as a CUDA graph per key (its input shapes), replayed with its inputs
copied in: how the "layer" prefill graphs (prefill_buckets.PREFILL_GRAPHS) replay a forward
whose layers run one compiled layer function, without a compile of the whole model per length,
and how the "recorded" decode step (generator.STEP_GRAPHS) replays the compiled step without
the per-call work of dynamo's guards and inductor's graph trees.

Inductor's own CUDA graphs (triton.cudagraphs) record only what one torch.compile'd function
runs; here the function is a single layer, called once per layer from the model's Python loop,
so the recording is ours: torch.cuda.graph around the whole forward. The first run of a key
runs the forward on a side stream (it compiles there, and its writes, the KV cache's, are the
ones the replay makes again), then records it; every run replays. All keys share one memory
pool: forwards never run at once, and the output is cloned before another replay can reuse its
memory. Off a GPU the forward just runs. A forward returns a tensor or a tuple of them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]


def recording() -> bool:
    """Whether a CUDA graph is being recorded on the current stream: a forward hook that waits
    between layers on other streams (offload's layer-wise reload) cannot be recorded."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class RecordedForwards:
    """forward(*inputs) -> Tensor, replayed as a CUDA graph per key on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # key -> (graph, the inputs it reads, the output(s) it writes)
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[Tensor], Outputs]] = {}
        self._pool: tuple[int, int] | None = None  # the first graph's pool, shared by the rest
        self._state: Hashable = None  # what the graphs were recorded under (follow())

    def __len__(self) -> int:
        """How many graphs were recorded."""
        return len(self._graphs)

    def follow(self, state: Hashable) -> None:
        """Drop every graph unless they were recorded under `state` (the Generator's: its
        model's cache_version, since a graph writes the KV cache at the addresses it was
        recorded with, and a new cache has new ones)."""
        if state != self._state:
            self._graphs.clear()
            self._state = state

    def run(self, key: Hashable, forward: Callable[..., Outputs],
            inputs: Sequence[Tensor]) -> Outputs:
        """forward(*inputs); on CUDA from the graph recorded for `key` (recorded now if none
        is): inputs must keep the shapes, dtypes and strides they had when key was recorded."""
        if self.device.type != "cuda":
            return forward(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(forward, inputs)
        else:
            for held, given in zip(entry[1], inputs, strict=True):
                if held.shape != given.shape or held.dtype != given.dtype:
                    raise ValueError(f"graph {key!r} was recorded with {held.dtype} "
                                     f"{tuple(held.shape)}, given {given.dtype} "
                                     f"{tuple(given.shape)}")
                held.copy_(given)
        graph, _, out = entry
        graph.replay()
        # the pool's memory is another graph's on its next replay: copies outlive it
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def _record(self, forward: Callable[..., Outputs], inputs: Sequence[Tensor]
                ) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Outputs]:
        held = [x.clone() for x in inputs]  # outside the pool: they outlive every replay
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # compiles and warms (cuBLAS handles, workspaces)
            forward(*held)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward(*held)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, held, out
