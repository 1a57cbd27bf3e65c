"""A forward recorded as a CUDA graph per key (its input shapes), replayed with its inputs
copied in: how the "layer" prefill graphs (prefill_buckets.PREFILL_GRAPHS) replay a forward
whose layers run one compiled layer function, without a compile of the whole model per length,
and how the "recorded" decode step (generator.STEP_GRAPHS) replays the compiled step without
the per-call work of dynamo's guards and inductor's graph trees.

Inductor's own CUDA graphs (triton.cudagraphs) record only what one torch.compile'd function
runs; here the function is a single layer, called once per layer from the model's Python loop,
so the recording is ours: torch.cuda.graph around the whole forward. The first run of a key
runs the forward on a side stream (it compiles there) and returns that run's output; the graph
recorded after it (a recording executes nothing) serves every later run. The first run is not
replayed: a ring cache's update reads the window it then overwrites, so running a chunk twice
would not give what running it once gives. All keys share one memory pool: forwards never run
at once, and the output is cloned before another replay can reuse its memory.

cuBLAS keeps a workspace per (handle, stream), made on first use and kept: one made while
recording lands in the recording's pool, and every recording runs on torch's one capture
stream, so a later recording, of another Generator too, would use that workspace, in a pool
that goes when the graphs that hold it do (a CUDAGraph's reset clears the capture stream's
workspace and releases its pool). Each recording therefore starts and ends with the
workspaces cleared (as inductor's graph trees do): a graph's workspace is then its own pool's,
and no later recording borrows it, whose replays would touch freed memory once this pool
goes (on an H100, a second Generator's replay in one process hit an illegal address after the
first Generator's graphs were freed, and ran clean alone: the failure this guards against).

A graph reads and writes the model's buffers (KV caches, RoPE tables) at the addresses it was
recorded with: the graphs are kept per `state` (follow(): the buffers' addresses and shapes),
so a cache allocated anew gets graphs of its own, and one allocated again at the old addresses
(a batch size coming back) finds its graphs again. Off a GPU the forward just runs. A forward
returns a tensor or a tuple of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]
Entry = tuple[torch.cuda.CUDAGraph, list[Tensor], Outputs]  # graph, inputs read, outputs written
STATES_KEPT = 4  # the graphs of this many buffer states at most (the least recent dropped)


def recording() -> bool:
    """Whether a CUDA graph is being recorded on the current stream: a forward hook that waits
    between layers on other streams (offload's layer-wise reload) cannot be recorded."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _clear_workspaces() -> None:
    """Drop cuBLAS's cached workspaces (the next matrix product on a stream makes a new one)."""
    torch._C._cuda_clearCublasWorkspaces()


def _clone(out: Outputs) -> Outputs:
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


class RecordedForwards:
    """forward(*inputs) -> Tensor(s), replayed as a CUDA graph per key on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._states: OrderedDict[Hashable, dict[Hashable, Entry]] = OrderedDict()
        self._graphs: dict[Hashable, Entry] = {}  # the current state's: key -> entry
        self._state: Hashable = None  # the current state (follow's)
        self._pool: tuple[int, int] | None = None  # the first graph's pool, shared by the rest

    def __len__(self) -> int:
        """How many graphs the current state holds."""
        return len(self._graphs)

    def follow(self, state: Hashable) -> None:
        """Run under `state` from now on: its graphs, recorded earlier under it, or none yet.
        The graphs of the least recent states beyond STATES_KEPT are dropped (and the pool
        with the last of them: a pool no graph holds cannot record again)."""
        if state in self._states:
            self._states.move_to_end(state)
        else:
            self._states[state] = {}
            while len(self._states) > STATES_KEPT:
                self._states.popitem(last=False)
            if not any(self._states.values()):
                self._pool = None
        self._graphs, self._state = self._states[state], state

    def forget(self) -> None:
        """Drop every state's graphs and the pool (their inputs are about to move); the current
        state stays current, with no graphs."""
        self._states.clear()
        self._graphs = self._states[self._state] = {}
        self._pool = None

    def run(self, key: Hashable, forward: Callable[..., Outputs],
            inputs: Sequence[Tensor], persistent: bool = False) -> Outputs:
        """forward(*inputs); on CUDA from the graph recorded for `key` (recorded now if none
        is): inputs must keep the shapes, dtypes and strides they had when key was recorded.
        persistent: the inputs are buffers the caller keeps and fills, read in place (the very
        tensors the graph was recorded with), and the output one the forward writes, returned
        as is: no copies either way (layer_replays.py's)."""
        if self.device.type != "cuda":
            return forward(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            self._graphs[key], first = self._record(forward, inputs, persistent)
            return first
        for held, given in zip(entry[1], inputs, strict=True):
            if persistent and held is not given:
                raise ValueError(f"graph {key!r} reads the buffers it was recorded with")
            if held.shape != given.shape or held.dtype != given.dtype:
                raise ValueError(f"graph {key!r} was recorded with {held.dtype} "
                                 f"{tuple(held.shape)}, given {given.dtype} {tuple(given.shape)}")
            if not persistent:
                held.copy_(given)
        graph, _, out = entry
        graph.replay()
        # else the pool's memory is another graph's on its next replay
        return out if persistent else _clone(out)

    def _record(self, forward: Callable[..., Outputs], inputs: Sequence[Tensor],
                persistent: bool = False) -> tuple[Entry, Outputs]:
        """(the recorded entry, the first run's output: a copy, or as is when persistent)."""
        # outside the pool: they outlive every replay
        held = list(inputs) if persistent else [x.clone() for x in inputs]
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):  # compiles and warms (cuBLAS handles, workspaces)
            first = forward(*held)
        current.wait_stream(stream)
        for t in first if isinstance(first, tuple) else (first,):
            t.record_stream(current)  # made on the side stream, read on this one
        copies = first if persistent else _clone(first)
        graph = torch.cuda.CUDAGraph()
        _clear_workspaces()  # the recording makes its own, in this pool (the module says why)
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = forward(*held)
        finally:
            _clear_workspaces()  # nobody else records with a workspace of this pool
        if self._pool is None:
            self._pool = graph.pool()
        return (graph, held, out), copies
