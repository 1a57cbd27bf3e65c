"""Prefill + decode loop over a static-KV-cache Transformer, eager or compiled.

    gen = Generator(model)                        # owns the model's KV cache
    out = gen.generate([[1, 2, 3], [4, 5, 6]], GenerationConfig(max_new_tokens=32))
    out.output_token_ids                          # one list per prompt, stop id excluded

The loop, in gpt-fast's shape:
- prefill: the whole prompt [B, T] in one eager forward at positions 0..T-1, then sample the
  first new token (the Generator's default: T changes from call to call, and a graph per length
  would recompile for every prompt; bucketed_prefill below pads to a few lengths instead, since
  a short prompt's eager prefill is mostly kernel launches). With prefill_chunk=C, a prompt
  longer than C runs as forwards of C tokens at positions c..c+C-1, each attending over the
  cache the earlier chunks filled: activations and logits of C tokens at a time, never of the
  whole prompt.
  With bucketed_prefill (generate's default in compiled mode) and config.compile, each forward
  runs through one torch.compile'd function of the whole model (fullgraph, static shapes: a
  CUDA graph on a GPU) at a bucket length, the prompt padded up to it (prefill_buckets.py: the
  buckets, and why the pads change nothing), so a few graphs serve every prompt length; long
  prompts run as compiled chunks (full chunks at C, the last part at its bucket).
- decode: one token per sequence per step, [B, 1] at position input_pos. With compile=True this
  step is torch.compile(fullgraph=True, dynamic=False): static shapes, input_pos a device
  tensor; on CUDA it is replayed as a CUDA graph, built from eager's own kernels by default
  (identical tokens) or from inductor's fused kernels (COMPILE_BACKENDS below).
  fullgraph=True is also the guarantee that the step has no host sync (an .item() or .tolist()
  would be a graph break, and a graph break is an error).
- sampling (sampling.py) runs on the device with counter-based noise: no RNG state, no
  torch.multinomial; eager and compiled draw the same numbers.
- stop ids: a device-side `done` mask [B] is updated inside the step; the host looks at it only
  every `stop_check_interval` steps (one sync), so a decode step never waits for the GPU. With
  no stop ids the loop never syncs before the end.
  Tokens sampled after a sequence's first stop id are computed but dropped from the output.

Timing lives in bench/, not here. For it: prefill() and decode_step() are separate public calls,
generate() calls an optional hook at "start" (before prefill), "prefill" (first token sampled)
and after every "decode" step (a CUDA event recorded in the hook times each part without a
sync), and warmup() runs the compile / CUDA-graph capture for a shape beforehand.

Lengths: prompt length T + max_new_tokens must fit in the cache, else InfermeterError (it is not
silently capped: a benchmark must generate exactly what it asked for). Prompts of one batch must
have equal length (no left padding: positions are shared by the whole batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.chunk_attention import (
    CHUNK_ATTENTION,
    CHUNK_ATTENTIONS,
    BlockLists,
    block_lists,
    chunk_attention_for,
    flex_runs,
)
from infermeter.engine.dtypes import torch_dtype
from infermeter.engine.held_step import HeldSteps
from infermeter.engine.kernels.pdl import (
    inductor_options,
    launching,
    releasing_attention,
    supported,
)
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.layer_replays import LayerReplays, replays_prefill_layers
from infermeter.engine.model import Transformer, prefill_from
from infermeter.engine.moe import note_token_tiles, prefills_without_sync
from infermeter.engine.prefill_buckets import PREFILL_GRAPHS, prefill_forwards
from infermeter.engine.recorded_forward import RecordedForwards
from infermeter.engine.sampling import sample
from infermeter.engine.step_choice import attention_release_way, step_weight_bytes
from infermeter.errors import InfermeterError
from infermeter.specs.sizes import cache_length

# generate() calls hook(event, step): ("start", 0), ("prefill", 0), then ("decode", 1), ...
StepHook = Callable[[str, int], None]

# Dynamo keeps the graphs of one Python function together and, past its recompile_limit (8),
# fails a fullgraph compile: every (batch size, cache length, dtype, model, attention) is one
# graph of _decode_one, so a run of nine batch sizes in one process, or the GPU test suite, hit
# it (the GPU tests' dtype x kind matrix does). The graphs are wanted, not accidental.
STEP_GRAPH_LIMIT = 256


def allow_step_graphs() -> None:
    """Let dynamo keep up to STEP_GRAPH_LIMIT graphs of the decode step (never lowers it)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, STEP_GRAPH_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                             STEP_GRAPH_LIMIT)


# The compiled decode step, built by torch.compile(fullgraph=True, dynamic=False) either way:
# - "inductor" (the default; on CUDA with triton.cudagraphs, what mode="reduce-overhead" does):
#   fused Triton kernels replayed as one CUDA graph. On an H200, random Llama-2-7B fp16, 256
#   tokens took 1.3 s against eager's 11.4 s (results/engine-check-nvidia-h200-inductor.json).
# - "cudagraphs": eager's own aten kernels captured as a CUDA graph, no fusion. Kept for
#   comparison: functionalisation turns the in-place cache writes into copies, so it is slow
#   (4.1 s for the same 256 tokens), and it is not bitwise eager either (cuBLAS may pick other
#   kernels under stream capture).
# Neither gave token-identical fp16 greedy output over 256 steps on random weights (first
# difference at step 43 and 124 with inductor, 149 with cudagraphs), but neither did eager
# against eager in another process (124, 149): near-flat random logits whose top-2 gaps fall
# below rounding, and a GPU run that is not bitwise reproducible; see docs/engine.md.
COMPILE_BACKENDS = ("inductor", "cudagraphs")
# How the inductor-compiled step is replayed as a CUDA graph, the default first:
# - "trees": inductor's own (triton.cudagraphs, cudagraph trees): each step calls the compiled
#   function, whose guards and graph-tree checks run on the host before the replay;
# - "recorded": the step compiled without them and recorded by recorded_forward.py, a step then
#   being one replay that reads and advances its state in place (held_step.py). On an H200
#   the traced steps of models under 1B parameters began with 0.26-0.49 ms of idle GPU after
#   the input copies, the host's time, in the trees (docs/engine.md, "The fused step"); the
#   A/B is benchmarks/step_kernels_ab.py --graphs.
STEP_GRAPHS = ("trees", "recorded")
# Whether inductor tunes its own kernels' configs (block sizes, warps) for the decode step by
# timing neighbours while it compiles (coordinate descent, as gpt-fast): an A/B's setting, "on"
# by default; "off" keeps inductor's heuristic configs, the same in every process. Timing
# kernels of a few microseconds keeps different picks in different processes: at Llama-2-7B on
# an H100 one process ran an add + RMSNorm at 128 threads, another at 1,024, 4.38 against 3.09
# us (docs/engine.md). Recorded in the Result as config.compile_tuning.
COMPILE_TUNING_WAYS = ("on", "off")
COMPILE_TUNING = "on"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    greedy: bool = True  # argmax; temperature and top_p are used only when False
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: sample from the whole vocabulary
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # e.g. the tokenizer's EOS ids
    seed: int = 0
    compile: bool = False
    stop_check_interval: int = 16  # decode steps between host checks of the `done` mask

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))
        if self.max_new_tokens < 1:
            raise InfermeterError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise InfermeterError(f"temperature must be > 0 when sampling, got "
                                  f"{self.temperature} (use greedy decoding for temperature 0)")
        if not 0 < self.top_p <= 1:
            raise InfermeterError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stop_check_interval < 1:
            raise InfermeterError("stop_check_interval must be at least 1")


@dataclass
class GenerationOutput:
    output_token_ids: list[list[int]]  # per sequence, cut before its first stop id
    finished: list[bool]  # per sequence: True if a stop id ended it, False if max_new_tokens did
    prompt_len: int  # T, the same for every sequence
    num_decode_steps: int  # decode steps actually run (the first token comes from prefill)

    @property
    def batch_size(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_prefill_tokens(self) -> int:
        return self.batch_size * self.prompt_len

    @property
    def num_new_tokens(self) -> int:
        return sum(len(ids) for ids in self.output_token_ids)


@dataclass
class DecodeState:
    """What one decode step needs; all tensors live on the model's device."""

    token: Tensor  # int64 [B]: the last sampled token, the next step's input
    input_pos: Tensor  # int64 [1]: the position `token` is written at
    done: Tensor  # bool [B]: the sequence has sampled a stop id
    seed: Tensor  # int64 []: sampling seed (a tensor, so a new seed does not recompile)
    stop_ids: Tensor  # int64 [S], S >= 1 (a -1 sentinel when there are none: no empty shapes)
    next_pos: int  # host mirror of input_pos, to bounds-check without reading the device


def _decode_one(model: Transformer, token: Tensor, input_pos: Tensor, done: Tensor,
                stop_ids: Tensor, seed: Tensor, *, greedy: bool, temperature: float,
                top_p: float) -> tuple[Tensor, Tensor]:
    """One decode step: token [B] at input_pos [1] -> (next token [B], done [B]). No syncs."""
    logits = model(token[:, None], input_pos)  # [B, 1, V] float32; writes K/V at input_pos
    next_token = sample(logits[:, -1], greedy=greedy, temperature=temperature, top_p=top_p,
                        seed=seed, pos=input_pos + 1)
    done = done | (next_token[:, None] == stop_ids[None, :]).any(dim=-1)
    return next_token, done


def _decode_in_place(model: Transformer, token: Tensor, input_pos: Tensor, done: Tensor,
                     stop_ids: Tensor, seed: Tensor, history: Tensor, *, greedy: bool,
                     temperature: float, top_p: float) -> tuple[()]:
    """The recorded step (held_step.py): _decode_one, then the state advanced in place: the
    new token [B] into token and into history [L + 1, B] at row input_pos + 1, done or'ed,
    input_pos + 1. Returns nothing: the caller reads the history."""
    next_token, next_done = _decode_one(model, token, input_pos, done, stop_ids, seed,
                                        greedy=greedy, temperature=temperature, top_p=top_p)
    history.index_copy_(0, input_pos + 1, next_token[None])
    token.copy_(next_token)
    done.copy_(next_done)
    input_pos.add_(1)  # after every read of it (functionalisation orders the compiled step so)
    return ()


def _prefill_forward(model: Transformer, tokens: Tensor, positions: Tensor,
                     last: Tensor, blocks: BlockLists | None = None) -> Tensor:
    """One bucketed prefill forward: tokens [B, L] at positions [L] (writes their K/V) -> the
    logits [B, V] float32 of row last [1], the forward's last real token, the only row that gets
    the final norm and the output projection (a tensor: one graph serves every prompt length
    padded to L). blocks: a later chunk's tile lists for flex attention (chunk_attention.py),
    tensors too, so one graph serves every start."""
    return model(tokens, positions, blocks=blocks, rows=last)[:, 0]


def _block_step(layer: torch.nn.Module, h: Tensor, cos: Tensor, sin: Tensor,
                input_pos: Tensor, blocks: BlockLists | None = None) -> Tensor:
    """One transformer layer: what the compiled prefill compiles (Generator._block_fn, and the
    "layer" prefill graphs' Generator._layer_fn)."""
    return layer(h, cos, sin, input_pos, blocks)


def _no_hook(event: str, step: int) -> None:
    pass


class Generator:
    """Owns a Transformer and its KV cache; runs prefill and decode, eager or compiled.

    max_seq_len: a fixed cache length (what a benchmark wants: decode cost depends on it).
    None: each generate() sizes the cache to prompt + max_new_tokens rounded up to sizes.CACHE_ROUND
    tokens, within the model's max_seq_len. The cache is reallocated only when its shape changes.
    kv_dtype: the cache dtype (None: the model's parameter dtype); see Transformer.setup_cache.
    compile_backend: how the compiled decode step is built (see COMPILE_BACKENDS).
    compile_options: extra inductor options for it (benchmarks/decode_tuning.py compares some).
    fuse: fuse the model's q/k/v and gate/up projections in place first (fusion.py).
    compile_prefill: with config.compile, also run the prefill's layers through one
    torch.compile'd function (dynamic prompt length, no CUDA graph; _block_step). The eager
    prefill leaves RMSNorm, RoPE, SiLU and the residual adds unfused, inductor fuses them: on an
    H100, 71.7% MFU against 46.7% for a 2048-token Llama-2-7B prefill. Off by default: it adds
    ~25 s to the first compile and pays only for long prompts.
    decode_attention: how every layer attends in a one-token step (attention.ATTENTION_KINDS;
    None keeps the model's setting, attention.DECODE_ATTENTION unless changed). "flex" and
    "triton" apply to the compiled step only, "triton" only where Triton runs;
    decode_attention_used() says what a mode really runs.
    pdl: the compiled step's kernels (inductor's and the Triton ones) launched with
    programmatic dependent launch (pdl.py); only where pdl.supported says it can run.
    prefill_chunk: the longest forward a prefill runs, in tokens; a longer prompt is prefilled
    chunk by chunk into the KV cache (None, the default: the whole prompt in one forward).
    bucketed_prefill: with config.compile, prefill through _prefill_forward compiled at bucket
    lengths (prefill_buckets.py) instead of eager forwards at the prompt's own length (and
    instead of compile_prefill's layer graph). Not for MoE models, whose prefill groups tokens
    by expert (data-dependent shapes: no static graph): they prefill exactly as without it.
    prefill_graphs: one layer compiled per bucket length that every layer runs, the forward
    recorded as a CUDA graph per length ("layer", the default), the whole forward compiled per
    bucket length ("static") or once, of symbolic length ("dynamic"; prefill_buckets.
    PREFILL_GRAPHS); self.prefill_graphs says what runs: "static" under tensor parallelism and
    the cudagraphs compile backend.
    step_graphs: how the compiled decode step's CUDA graph is replayed (STEP_GRAPHS): inductor's
    graph trees ("trees") or recorded_forward.py's graph ("recorded"); self.step_graphs says
    what runs (None off a GPU). A recorded graph (the "layer" prefill's too) keeps the kernels
    it was recorded with, with no guard to notice a change: set the model's kernel choices
    (set_step_kernels, set_matvec_kernel, set_moe_kernel) before the first step, or build a
    new Generator.
    chunk_attention: how a bucketed chunk from a later start attends over a full layer's cache
    (chunk_attention.CHUNK_ATTENTIONS: "auto" is flex wherever flex runs);
    "flex" only where inductor compiles it on a GPU, self.chunk_attention says what runs.
    """

    def __init__(self, model: Transformer, max_seq_len: int | None = None,
                 kv_dtype: torch.dtype | str | None = None,
                 compile_backend: str | None = None,
                 compile_options: dict | None = None, fuse: bool = True,
                 compile_prefill: bool = False, decode_attention: str | None = None,
                 pdl: bool = False, prefill_chunk: int | None = None,
                 bucketed_prefill: bool = False, chunk_attention: str = CHUNK_ATTENTION,
                 prefill_graphs: str = PREFILL_GRAPHS[0],
                 step_graphs: str = STEP_GRAPHS[0]) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InfermeterError(f"prefill chunk must be at least 1 token, got {prefill_chunk}")
        if prefill_graphs not in PREFILL_GRAPHS:
            raise InfermeterError(f"unknown prefill graphs {prefill_graphs!r} "
                                  f"(use {' or '.join(PREFILL_GRAPHS)})")
        self._graphs_asked = prefill_graphs  # the prefill_graphs property decides
        if step_graphs not in STEP_GRAPHS:
            raise InfermeterError(f"unknown step graphs {step_graphs!r} "
                                  f"(use {' or '.join(STEP_GRAPHS)})")
        self._step_graphs_asked = step_graphs  # the step_graphs property decides
        if chunk_attention not in CHUNK_ATTENTIONS:
            raise InfermeterError(f"unknown chunk attention {chunk_attention!r} "
                                  f"(use {' or '.join(CHUNK_ATTENTIONS)})")
        self.prefill_chunk = prefill_chunk
        if decode_attention is not None:
            from infermeter.engine.attention import ATTENTION_KINDS

            if decode_attention not in ATTENTION_KINDS:
                raise InfermeterError(f"unknown decode attention {decode_attention!r} "
                                      f"(use {', '.join(ATTENTION_KINDS)})")
            for layer in model.layers:
                layer.attention.decode_attention = decode_attention
        if fuse:  # one wqkv and one w13 matrix per layer (fusion.py): faster, same function
            from infermeter.engine.fusion import fuse_projections

            fuse_projections(model)
        note_token_tiles(model)  # where this GPU's measured tiles take "auto" experts to Triton
        self.model = model
        self.compile_options = dict(compile_options or {})  # extra inductor options
        self.spec = model.spec
        self.device = model.tok_embeddings.weight.device
        if max_seq_len is not None and not 0 < max_seq_len <= self.spec.max_seq_len:
            raise InfermeterError(f"cache length {max_seq_len} must be in 1.."
                                  f"{self.spec.max_seq_len} (model {self.spec.name})")
        self.max_seq_len = max_seq_len
        self.kv_dtype = kv_dtype
        self.compile_backend = compile_backend or "inductor"
        if self.compile_backend not in COMPILE_BACKENDS:
            raise InfermeterError(f"unknown compile backend {self.compile_backend!r} "
                                  f"(use {' or '.join(COMPILE_BACKENDS)})")
        if self.compile_backend == "cudagraphs" and self.device.type != "cuda":
            raise InfermeterError("the cudagraphs compile backend needs a CUDA device")
        self._compiled_step: Callable[..., tuple[Tensor, ...]] | None = None
        self.compile_prefill = compile_prefill
        self.decode_attention = model.layers[0].attention.decode_attention if model.layers \
            else None
        self._compiled_block: Callable[..., Tensor] | None = None
        self._bucketed_asked = bucketed_prefill  # the bucketed_prefill property decides
        # flex needs inductor's kernel (outside it flex_attention is a slow reference): the
        # bucketed prefill compiled by inductor on a GPU, else the mask
        self.chunk_attention = chunk_attention_for(
            chunk_attention, flex_runs(self.device, self.compile_backend, bucketed_prefill))
        self._compiled_prefill: Callable[..., Tensor] | None = None
        self._compiled_layer: Callable[..., Tensor] | None = None
        self.recorded = RecordedForwards(self.device)  # the "layer" prefill graphs' forwards
        self.recorded_steps = RecordedForwards(self.device)  # the "recorded" decode steps
        self.held_steps = HeldSteps()  # the state those steps read and advance in place
        self.layer_replays = LayerReplays(self.device)  # the exact prefill's layers
        self._state_version, self._state = -1, ()  # _buffers_state()'s
        if pdl and not supported(self.device):
            raise InfermeterError("programmatic dependent launch (--pdl) needs a CUDA GPU of "
                                  "compute capability 9.0 or later (Hopper), Triton and a "
                                  "torch whose inductor has triton.enable_pdl; this run has "
                                  f"{self.device}")
        if pdl and self.compile_backend != "inductor":
            raise InfermeterError("--pdl needs the inductor compile backend")
        self.pdl = pdl

    @property
    def bucketed_prefill(self) -> bool:
        """Whether the compiled mode prefills through the bucketed graphs: asked for, and the
        model's MoE blocks (if any) group their tokens by expert without a host sync (moe_kernel
        "triton" or "auto" where Triton runs: kernels/expert_gemm.py; the torch grouped path's
        loop over experts holds no static graph). Asked each prefill, since the runner sets
        moe_kernel after building the Generator. A bucket's pads route like any token (their
        experts' outputs are computed and discarded with the pads' rows)."""
        return self._bucketed_asked and prefills_without_sync(self.model)

    def replays_prefill(self, compiled: bool, forward_len: int) -> bool:
        """Whether a prefill (compiled or not) of forwards forward_len tokens long replays each
        layer as a CUDA graph: layer_replays.replays_prefill_layers, the rule generate's fit
        check counts the replays' buffers by (the exact prefill through compile_prefill, on a
        GPU, one rank, a model whose prefill has no host sync). Asked each prefill, as
        bucketed_prefill."""
        return replays_prefill_layers(
            compiled=compiled, bucketed=compiled and self.bucketed_prefill,
            compile_prefill=self.compile_prefill, forward_len=forward_len,
            on_gpu=self.device.type == "cuda", one_rank=self.model.tp_collectives is None,
            without_sync=prefills_without_sync(self.model))

    @property
    def prefill_graphs(self) -> str:
        """How the bucketed prefill's forwards are compiled (PREFILL_GRAPHS): as asked, but
        "static" in place of "layer" under tensor parallelism (set after the Generator is built:
        each layer's all-reduce hooks are closures of their own, so one layer function would
        compile a graph per layer; with the adds fused with the norms, add_norm, none runs at
        all) and under the cudagraphs backend (no inductor to compile a layer alone)."""
        if self._graphs_asked == "layer" and (self.model.tp_collectives is not None
                                             or self.model.add_norm is not None
                                             or self.compile_backend == "cudagraphs"):
            return "static"
        return self._graphs_asked

    @property
    def step_graphs(self) -> str | None:
        """How the compiled decode step is replayed (STEP_GRAPHS): as asked on a CUDA device
        with the inductor backend, "trees" under the cudagraphs backend (its own graphs) and for
        an MoE model, None off a GPU (no graph: the compiled function runs)."""
        if self.device.type != "cuda":
            return None
        # an MoE layer notes the experts its step routed to (MoEFeedForward.last_experts, which
        # the expert count reads after each step) in Python, which a replay would not repeat
        if self.compile_backend == "cudagraphs" or self.spec.n_experts > 0:
            return "trees"
        return self._step_graphs_asked

    def decode_attention_used(self, compiled: bool, batch_size: int) -> str | None:
        """The attention a one-token step of batch_size sequences really runs (Attention.forward's
        rule): "auto" by batch size (attention.resolve_attention); "flex" and "triton" only in
        the compiled step, "triton" only where the kernel can run (CUDA or Triton's
        interpreter, a power-of-two head size); "math" in their place otherwise, and in place
        of "sdpa" for a model that soft-caps attention logits or has attention sinks (gpt-oss;
        SDPA can do neither)."""
        from infermeter.engine.attention import resolve_attention
        from infermeter.engine.kernels.triton_support import head_size_fits, triton_runs_on

        if self.decode_attention is None:
            return None
        kind = resolve_attention(self.decode_attention, batch_size)
        if kind in ("flex", "triton") and not compiled or \
                kind == "sdpa" and self.spec.sdpa_cannot_attend:
            return "math"
        probe = self.model.tok_embeddings.weight
        if kind == "triton" and not (triton_runs_on(probe)
                                     and head_size_fits(self.spec.head_dim)):
            return "math"
        return kind

    # ---- setup ---------------------------------------------------------------------------
    def prepare(self, batch_size: int, prompt_len: int, max_new_tokens: int) -> None:
        """Check that the lengths fit; make the cache [batch_size, length] and empty."""
        length = cache_length(self.spec, prompt_len, max_new_tokens, self.max_seq_len)
        model = self.model
        dtype = model.tok_embeddings.weight.dtype if self.kv_dtype is None else torch_dtype(
            self.kv_dtype)
        same = (model.max_batch_size, model.max_seq_len) == (batch_size, length)
        if same and model.cache_dtype == dtype:
            model.reset_cache()  # stale entries would be masked anyway; zeros are clearer
        else:
            model.setup_cache(batch_size, length, dtype=dtype, device=self.device)

    def _options(self, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Inductor's options for each of our compiles: eager's roundings (emulate_precision_
        casts), our ops made fallbacks before lowering (op_fallbacks.py), `settings`, then the
        request's own options, which win."""
        from infermeter.engine import op_fallbacks

        return {"emulate_precision_casts": True, **op_fallbacks.inductor_options(),
                **(settings or {}), **self.compile_options}

    def _compile_step(self) -> Callable[..., tuple[Tensor, ...]]:
        if self._compiled_step is None:
            allow_step_graphs()
            if self.compile_backend == "cudagraphs":
                self._compiled_step = torch.compile(_decode_one, backend="cudagraphs",
                                                    fullgraph=True, dynamic=False)
                return self._compiled_step
            # emulate_precision_casts makes inductor round to the activation dtype between
            # fused ops where eager rounds; reduction order and FMA contraction still differ.
            # coordinate_descent_tuning (as gpt-fast) tunes the Triton kernels' block sizes
            # at compile time, and turns each matrix-vector product into a Triton reduction
            # fused with its neighbours: on an H100, fused 7B fp16 decode 5.89 -> 5.59 ms per
            # step (results/decode-tuning-nvidia-h100-80gb-hbm3.json), for ~30 s more compile;
            # that was before the GEMV took the products (COMPILE_TUNING's A/B asks again).
            tuning = checked_way(COMPILE_TUNING, "COMPILE_TUNING", COMPILE_TUNING_WAYS) == "on"
            options = self._options({"coordinate_descent_tuning": tuning,
                                     "triton.cudagraphs": self.step_graphs == "trees",
                                     **inductor_options(self.pdl)})
            # the recorded step advances its state in place (held_step.py), the trees' returns it
            compiled = torch.compile(
                _decode_in_place if self.step_graphs == "recorded" else _decode_one,
                options=options, fullgraph=True, dynamic=False)

            # where the fused step's attention kernels release the next one, by its size
            first = attention_release_way(step_weight_bytes(self.model)) == "before"

            def step(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
                # the ops the trace picks (and dynamo guards on), and how they launch
                with launching(self.pdl), releasing_attention(first):
                    return compiled(*args, **kwargs)

            self._compiled_step = step
        return self._compiled_step

    def _block_fn(self) -> Callable[..., Tensor]:
        """The compiled prefill's layer function: one graph for every layer (modules are
        inlined, their weights become inputs) and every prompt length (dynamic=True)."""
        if self._compiled_block is None:
            self._compiled_block = torch.compile(_block_step, options=self._options(),
                                                 dynamic=True)
        return self._compiled_block

    def _prefill_fn(self) -> Callable[..., Tensor]:
        """The bucketed prefill's compiled forward (inductor's CUDA graph on a GPU, as the decode
        step; the decode step's backend): one graph per bucket length (dynamic=False), or with
        prefill_graphs "dynamic" one graph whose length _bucketed marks symbolic (dynamic=None:
        dynamo's marks and its automatic dynamic shapes, the rest static)."""
        if self._compiled_prefill is None:
            allow_step_graphs()
            dynamic = None if self.prefill_graphs == "dynamic" else False
            if self.compile_backend == "cudagraphs":
                self._compiled_prefill = torch.compile(_prefill_forward, backend="cudagraphs",
                                                       fullgraph=True, dynamic=dynamic)
            else:
                options = self._options({"triton.cudagraphs": self.device.type == "cuda"})
                self._compiled_prefill = torch.compile(_prefill_forward, options=options,
                                                       fullgraph=True, dynamic=dynamic)
        return self._compiled_prefill

    def _layer_fn(self) -> Callable[..., Tensor]:
        """The "layer" prefill graphs' compiled layer: a graph per forward length (static
        shapes: the "static" forward's kernels), each shared by every layer of one kind (modules
        are inlined, their weights become inputs), without inductor's CUDA graph: the whole
        forward is recorded as one (recorded_forward.py)."""
        if self._compiled_layer is None:
            allow_step_graphs()
            self._compiled_layer = torch.compile(_block_step, options=self._options(),
                                                 fullgraph=True, dynamic=False)
        return self._compiled_layer

    def _layer_forward(self, tokens: Tensor, positions: Tensor, last: Tensor,
                       *blocks: Tensor) -> Tensor:
        """_prefill_forward with each layer through _layer_fn; blocks: a BlockLists' tensors,
        flat (none: the mask), so that every input is a tensor a recorded graph can hold."""
        return self.model(tokens, positions, block_fn=self._layer_fn(),
                          blocks=tuple(blocks) or None, rows=last)[:, 0]

    def prefill_lengths(self, prompt_len: int, compiled: bool, start: int = 0) -> list[int]:
        """The length of each forward a prefill of prompt_len tokens runs (after prepare())."""
        if compiled and self.bucketed_prefill:
            room = self.model.max_seq_len - start
            return [length for _, length in prefill_forwards(prompt_len, self.prefill_chunk,
                                                             room)]
        chunk = min(self.prefill_chunk or prompt_len, prompt_len)
        return [min(chunk, prompt_len - offset) for offset in range(0, prompt_len, chunk)]

    def _bucketed(self, tokens: Tensor, start: int) -> Tensor:
        """Prefill tokens [B, T] at start.. through the compiled forward at bucket lengths; the
        last real token's logits [B, V]. Pads: copies of the last token, all at position
        start + T (prefill_buckets.py says why they change nothing)."""
        batch, prompt_len = tokens.shape
        int64 = {"dtype": torch.int64, "device": self.device}
        self.recorded.follow(self._buffers_state())  # a new cache: graphs of its own
        graphs, offset = self.prefill_graphs, 0
        for real, length in prefill_forwards(prompt_len, self.prefill_chunk,
                                             self.model.max_seq_len - start):
            # [B, real] with its own strides: a chunk's view keeps the prompt's row stride (even
            # at batch 1, where contiguous() keeps it), and the graph guards on strides: else
            # every prompt length would compile its chunks again
            piece = tokens[:, offset:offset + real].clone(memory_format=torch.contiguous_format)
            positions = torch.arange(start + offset, start + offset + real, **int64)
            if length > real:  # the last forward only
                piece = torch.cat((piece, piece[:, -1:].expand(batch, length - real)), dim=1)
                positions = torch.cat((positions, torch.full((length - real,),
                                                             start + prompt_len, **int64)))
            if graphs == "dynamic":  # one graph: the length symbolic from the start
                torch._dynamo.maybe_mark_dynamic(piece, 1)
                torch._dynamo.maybe_mark_dynamic(positions, 0)
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # a new CUDA-graph iteration
            # Two graphs a length at most: from 0 (causal on its own K/V), and later chunks
            # over the whole cache with a mask (a graph per start would compile per chunk).
            later = start + offset > 0
            blocks = block_lists(start + offset, length, self.model.max_seq_len, self.device) \
                if later and self.chunk_attention == "flex" else None
            last = torch.full((1,), real - 1, **int64)
            with prefill_from(self.model, None if later else 0):
                if graphs == "layer":
                    logits = self.recorded.run((batch, length, later), self._layer_forward,
                                               (piece, positions, last, *(blocks or ())))
                else:
                    logits = self._prefill_fn()(self.model, piece, positions, last,
                                                blocks)  # [B, V]
            offset += real
        return logits

    # ---- the two phases --------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: Tensor, config: GenerationConfig, start: int = 0) -> DecodeState:
        """Run the prompt tokens [B, T] at positions start..start+T-1 (cache prepared, holding
        the first `start` positions: none for a new request, a reloaded prefix for offload);
        sample the first new token."""
        batch_size, prompt_len = tokens.shape
        end_pos = start + prompt_len
        if batch_size != self.model.max_batch_size or end_pos > self.model.max_seq_len:
            after = f" after {start} cached" if start else ""
            raise InfermeterError(f"prompt batch {batch_size} x {prompt_len} tokens{after} does "
                                  f"not fit the KV cache ({self.model.max_batch_size} x "
                                  f"{self.model.max_seq_len}); call prepare() first")
        # Small state tensors by fill kernels and an async copy: torch.tensor(..., device=cuda)
        # would be a synchronizing cudaMemcpy in the middle of the timed region.
        int64 = {"dtype": torch.int64, "device": self.device}
        seed = torch.full((), config.seed & 0xFFFFFFFF, **int64)
        input_pos = torch.full((1,), end_pos, **int64)
        stop_ids = torch.tensor(sorted(config.stop_ids) or [-1], dtype=torch.int64)
        # (From pageable memory the copy stages the bytes before returning: no lifetime issue.)
        stop_ids = stop_ids.to(self.device, non_blocking=True)  # [S]
        if config.compile and self.bucketed_prefill:
            last = self._bucketed(tokens, start)  # [B, V] float32
        else:
            last = self._exact(tokens, start, config.compile)
        first = sample(last, greedy=config.greedy, temperature=config.temperature,
                       top_p=config.top_p, seed=seed, pos=input_pos)
        done = (first[:, None] == stop_ids[None, :]).any(dim=-1)
        return DecodeState(first, input_pos, done, seed, stop_ids, end_pos)

    def _exact(self, tokens: Tensor, start: int, compile: bool) -> Tensor:
        """Prefill tokens [B, T] at start.. in forwards of the prompt's own length (chunks of
        prefill_chunk), eager or through compile_prefill's layer graph; the last row's logits
        [B, V], the only row that gets the output projection (earlier chunks compute none)."""
        prompt_len = tokens.shape[1]
        chunk = min(self.prefill_chunk or prompt_len, prompt_len)
        block_fn = self._block_fn() if compile and self.compile_prefill and chunk > 1 else None
        if block_fn is not None and self.replays_prefill(compile, chunk):
            self.layer_replays.follow(self._buffers_state())  # a new cache: graphs of its own
            block_fn = self.layer_replays.wrap(block_fn, self.model.layers)
        int64 = {"dtype": torch.int64, "device": self.device}
        for offset in range(0, prompt_len, chunk):  # each chunk's K/V land in the cache
            end = min(offset + chunk, prompt_len)
            positions = torch.arange(start + offset, start + end, **int64)  # [C]
            rows = torch.full((1,), end - offset - 1, **int64) if end == prompt_len else \
                torch.empty(0, **int64)  # the prompt's last row, or none before the last chunk
            # Eager forwards attend to the slots before their end; the layer graph, like the
            # bucketed one, knows only a start of 0 (else a graph per chunk).
            known = start + offset if block_fn is None or start + offset == 0 else None
            with prefill_from(self.model, known):
                logits = self.model(tokens[:, offset:end], positions,  # [B, 1 or 0, V] float32
                                    block_fn=block_fn, rows=rows)
        return logits[:, -1]

    @torch.no_grad()
    def decode_step(self, state: DecodeState, config: GenerationConfig) -> Tensor:
        """Feed state.token, sample the next one [B] (returned, also kept in state). No sync."""
        if state.next_pos >= self.model.max_seq_len:
            raise InfermeterError(f"decode position {state.next_pos} is past the KV cache of "
                                  f"{self.model.max_seq_len} tokens")
        sampling = {"greedy": config.greedy, "temperature": config.temperature,
                    "top_p": config.top_p}  # constants of the compiled step
        inputs = (state.token, state.input_pos, state.done, state.stop_ids, state.seed)
        if not config.compile:
            token, done = _decode_one(self.model, *inputs, **sampling)
        elif self.step_graphs == "recorded":
            self.recorded_steps.follow(self._buffers_state())  # a new cache: graphs of its own
            length = self.model.max_seq_len
            key = (*(tuple(t.shape) for t in inputs), length, *sampling.values())
            held = self.held_steps.hold(state, key, length)  # state's fields are now held's
            # one replay: the graph reads the state in place and advances it (held_step.py)
            self.recorded_steps.run(key, functools.partial(self._compile_step(), self.model,
                                                           **sampling),
                                    held.inputs(), persistent=True)
            state.next_pos += 1
            return held.history[state.next_pos]  # [B], the token fed at next_pos
        else:
            if self.device.type == "cuda":
                # A new CUDA-graph iteration: earlier outputs may be overwritten from here on.
                torch.compiler.cudagraph_mark_step_begin()
            token, done = self._compile_step()(self.model, *inputs, **sampling)
            # CUDA-graph outputs live in a buffer the next replay overwrites: keep copies.
            token, done = token.clone(), done.clone()
        state.token, state.done = token, done
        state.input_pos += 1  # in place on the device: no sync, same tensor every step
        state.next_pos += 1
        return token

    # ---- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]] | Tensor, config: GenerationConfig,
                 hook: StepHook | None = None) -> GenerationOutput:
        """Generate up to config.max_new_tokens tokens after each prompt (equal lengths)."""
        tokens = self.prompt_tensor(prompt_ids)  # [B, T]
        batch_size, prompt_len = tokens.shape
        self.prepare(batch_size, prompt_len, config.max_new_tokens)
        hook = hook or _no_hook
        hook("start", 0)
        state = self.prefill(tokens, config)
        hook("prefill", 0)
        generated = [state.token]  # max_new_tokens tensors of [B], read back once at the end
        steps = 0
        while len(generated) < config.max_new_tokens:
            check = config.stop_ids and steps and steps % config.stop_check_interval == 0
            if check and self._all_done(state.done):
                break
            generated.append(self.decode_step(state, config))
            steps += 1
            hook("decode", steps)
        rows = torch.stack(generated, dim=1).tolist()  # the one big sync: [B, n] to the host
        outputs, finished = [], []
        for row in rows:
            cut = next((i for i, t in enumerate(row) if t in config.stop_ids), None)
            outputs.append(row if cut is None else row[:cut])
            finished.append(cut is not None)
        return GenerationOutput(outputs, finished, prompt_len, steps)

    @torch.no_grad()
    def warmup(self, batch_size: int, prompt_len: int, config: GenerationConfig,
               decode_steps: int = 3) -> None:
        """Compile and capture (CUDA graphs: warm-up, record, replay = 3 steps) for this shape.

        Uses the cache a generate() with the same batch, prompt length and config will use, so
        that call neither reallocates the cache nor recompiles.
        """
        self.prepare(batch_size, prompt_len, config.max_new_tokens)
        tokens = torch.zeros(batch_size, prompt_len, dtype=torch.int64, device=self.device)
        # A bucketed prefill's CUDA graphs are recorded at their second run, replayed from the
        # third (cudagraph trees): all three here, so that no timed prefill records.
        graphs = config.compile and self.bucketed_prefill and self.device.type == "cuda"
        for _ in range(2 if graphs else 0):
            self.prefill(tokens, config)
        state = self.prefill(tokens, config)
        for _ in range(min(decode_steps, config.max_new_tokens - 1)):
            self.decode_step(state, config)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model.reset_cache()

    # ---- helpers -----------------------------------------------------------------------------
    def _buffers_state(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The model's buffers' (KV caches', RoPE tables') addresses and shapes: what a recorded
        graph reads and writes besides its inputs (recorded_forward.py keeps graphs per state).
        Computed again only when the model's cache_version moves (a cache allocated or freed)."""
        if self._state_version != self.model.cache_version:
            self._state_version = self.model.cache_version
            self._state = tuple((b.data_ptr(), tuple(b.shape)) for b in self.model.buffers())
        return self._state

    def _all_done(self, done: Tensor) -> bool:
        """The loop's only host sync before the end: have all sequences hit a stop id?"""
        return bool(done.all())

    def prompt_tensor(self, prompt_ids: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Validate prompts (non-empty, equal length, ids in the vocabulary) -> int64 [B, T]."""
        if isinstance(prompt_ids, Tensor):
            tokens = prompt_ids.to(device=self.device, dtype=torch.int64)
            if tokens.dim() != 2:
                raise InfermeterError(f"prompt tensor must be [batch, length], got "
                                      f"{tuple(tokens.shape)}")
        else:
            if len(prompt_ids) == 0:
                raise InfermeterError("no prompts: need at least one sequence of one token")
            lengths = {len(p) for p in prompt_ids}
            if len(lengths) > 1:
                raise InfermeterError(f"prompts of one batch must have equal length (no "
                                      f"padding support), got lengths {sorted(lengths)}")
            tokens = torch.tensor([list(p) for p in prompt_ids], dtype=torch.int64,
                                  device=self.device).reshape(len(prompt_ids), -1)
        if tokens.numel() == 0:
            raise InfermeterError("empty prompt: need at least one sequence of one token")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.spec.vocab_size:
            raise InfermeterError(f"prompt token id {low if low < 0 else high} is outside the "
                                  f"vocabulary of {self.spec.vocab_size}")
        return tokens
