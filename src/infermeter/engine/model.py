"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3's text
model, Mixtral and Qwen3-MoE) with a static KV cache: the layers (TransformerBlock: attention,
FFN, norms and residual adds, the fused batch-1 step), the Transformer around them and
build_model. A layer's attention is self_attention.py's Attention; its norms are norms.py's.

Parameter names are Meta's (llama/model.py), so a Meta checkpoint loads without renaming:
  tok_embeddings.weight, norm.weight, output.weight,
  layers.{i}.attention.{wq,wk,wv,wo}.weight (+ wq/wk/wv .bias when spec.qkv_bias, Qwen2),
  layers.{i}.feed_forward.{w1,w2,w3}.weight   (SwiGLU: w2(silu(w1 x) * w3 x)),
  layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight,
  layers.{i}.attention.{q_norm,k_norm}.weight  (Qwen3, Gemma 3, spec.qk_norm: [head_dim] each),
  layers.{i}.{attention_post_norm,ffn_post_norm}.weight  (Gemma 2 and 3: norms of attention's
  and the FFN's outputs; ffn_norm is then their pre_feedforward_layernorm).
  layers.{i}.feed_forward.{gate,w1,w2,w3}.weight  (an MoE layer, moe.py: router [E, dim] and
  the experts stacked, [E, ffn, dim] / [E, dim, ffn]).
With tied embeddings `output.weight` *is* `tok_embeddings.weight` (one Parameter, two names);
`tie_weights()` restores the sharing after `load_state_dict(assign=True)` replaced Parameters.

Decisions (attention's own, GQA without copying K/V, the prefill paths, q/k norms, Gemma's
query rescale and soft cap: self_attention.py; the norms' float32: norms.py):
- RoPE uses Meta's interleaved pairs (rope.py); cos/sin tables are float32 buffers built by
  `setup_cache` for positions < max_seq_len (not in __init__, so a model built on the meta
  device gets real tables, and a 128k-context spec does not pay for tables it never uses).
- The KV cache dtype defaults to the parameter dtype; fp32/fp16/bf16 are supported. When it
  differs from the activations, K/V are converted on read (costs a cast per step). fp8/int8 KV
  raise InfermeterError (not supported by the engine yet).
- forward() always returns float32 logits for all T positions (Gemma's soft-capping, where the
  spec has it, applied in float32).
- Gemma 2 and 3 (GEMMA_ARCHS): sliding-window layers read RoPE tables of rope_local_theta,
  global ones rope_theta with its scaling (setup_cache builds both); GeGLU's gelu is left to
  inductor (the activation kernels are SiLU's; the fused step's norm + w13 kernel computes it);
  the peer all-reduce fused with add and norm (add_norm) is refused, since Gemma's post-norms
  sit between the all-reduce and the residual add. Gemma 3 alone has q/k norms and a local RoPE
  base. Their norms' (1 + w): norms.py; the query rescale and Gemma 2's attention-logit soft
  cap: self_attention.py.
- Fused projections at run time (fusion.py, what Generator does by default): wq/wk/wv become one
  `wqkv` and w1/w3 one `w13`, so a decode step runs 4 matrix-vector products per layer instead
  of 7 (larger reads get nearer HBM bandwidth). Checkpoints keep Meta's names: loading happens
  before fusion, and `fusion.meta_state_dict` gives a fused model's weights back by those names.
- A one-token step attends as self_attention.py says; while compiling, SwiGLU's activation
  runs in swiglu_kernel.py's Triton kernel (or an op inductor cannot inline, opaque_ops.py),
  and one-row products in gemv_kernel.py's GEMV.
- A layer's step_kernels "fused" (set_step_kernels; generate's "auto" sets it for small dense
  models, step_choice.py) runs a
  compiled batch-1 step's layer as kernels/fused_step.py's four kernels (norms, SwiGLU and
  residual adds inside the products; q/k norms, RoPE and the cache write in wqkv's where
  Attention.fuses_rope_and_cache allows), each where fused_parts() allows it (a Gemma or MoE
  layer takes some of the four); every other step is unchanged.
- Tensor parallelism (parallel.py) shards a built model in place: it narrows the weights, sets
  each Attention's n_heads / n_kv_heads to the rank's share and adds the collectives as forward
  hooks. So everything here reads head counts from the Attention modules (the cache included),
  never from the spec, and never knows a rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infermeter.engine.chunk_attention import BlockLists
from infermeter.engine.dtypes import torch_dtype
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.linear import Linear
from infermeter.engine.moe import MoEFeedForward
from infermeter.engine.norms import GemmaRMSNorm, RMSNorm, norm_class
from infermeter.engine.opaque_ops import compiling, materialize, silu_mul
from infermeter.engine.random_weights import init_random_weights
from infermeter.engine.rope import check_rope, rope_tables
from infermeter.engine.self_attention import Attention
from infermeter.errors import InfermeterError
from infermeter.specs.model import GEMMA_ARCHS, ModelSpec, check_engine_arch


# The Triton kernels run only inside a compiled step (compiling()), so their modules are
# imported there: importing one registers its torch.library ops, which pulls in dynamo and
# inductor (seconds), a cost an eager or sizing-only process never needs.
def fused_step_kernels_usable(x: Tensor, params: list[Tensor]) -> bool:
    from infermeter.engine.kernels.fused_step import fused_step_usable

    return fused_step_usable(x, *params)


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) fill at construction: build_model makes the model on
    the meta device, then fills every weight itself (random_weights.py) or from a checkpoint.
    On meta that fill would also import torch's compiler, a second of every process's start."""

    def reset_parameters(self) -> None:
        pass


# Whether the fused step runs its final norm and the output head as one kernel (Transformer.
# fuses_head): "off", the norm as inductor's kernel and the head as the GEMV (the default: on
# an H100 the fused head was 1.017x and 1.011x slower at 135M and 0.5B, level at 1B; docs/
# engine.md), "on". Recorded in the Result (config.fused_head).
FUSED_HEAD_WAYS = ("off", "on")
FUSED_HEAD = "off"

# How a compiled step computes SwiGLU's activation: "triton" (the default: swiglu_kernel.py, one
# kernel; falls back to "aten" where Triton cannot run), "aten" (opaque_ops.silu_mul, two eager
# kernels, measured faster than "inline" on an H100) or "inline" (inductor fuses it into w2's
# kernel). Eager always computes it inline. Beside the GEMV and the Triton attention (the
# defaults) "triton" is the fastest (docs/engine.md, "Kernels").
ACTIVATION_KERNEL = "triton"
ACTIVATION_KERNELS = ("inline", "aten", "triton")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: bool = False) -> None:
        super().__init__()
        self.gelu = gelu  # GeGLU with tanh gelu (Gemma) instead of SwiGLU
        self.w1 = Linear(dim, hidden, bias=False)  # gate
        self.w2 = Linear(hidden, dim, bias=False)  # down
        self.w3 = Linear(dim, hidden, bias=False)  # up
        self.w13: Linear | None = None  # fusion.py: [gate rows; up rows], once fused
        self.activation_kernel = ACTIVATION_KERNEL

    def forward(self, x: Tensor, norm: RMSNorm | None = None,
                residual: Tensor | None = None,
                ahead: tuple[Tensor | None, ...] = (None, None)) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]. The fused batch-1 step (TransformerBlock.fused_parts)
        may pass x un-normed with its norm (norm + w13 + SwiGLU or GeGLU in one kernel) and the
        residual (w2 + the add in one kernel: the output is then residual + FFN(x)); ahead:
        the weights those two kernels prefetch (kernels/prefetch.py)."""
        if norm is not None and self.w13 is not None:
            from infermeter.engine.kernels.fused_step import norm_matvec_swiglu

            act = norm_matvec_swiglu(x.reshape(1, -1), norm.weight, self.w13.weight, norm.eps,
                                     isinstance(norm, GemmaRMSNorm), self.gelu,
                                     ahead[0])  # [1, hidden]
        else:
            act = self._activation(x)  # [B, T, hidden]
        if residual is not None:
            from infermeter.engine.kernels.fused_step import matvec_add

            return matvec_add(act.reshape(1, -1), self.w2.weight,
                              residual.reshape(1, -1), ahead[1]).view_as(residual)
        return self.w2(act.view(*x.shape[:-1], -1))

    def _activation(self, x: Tensor) -> Tensor:
        """act(gate) * up of x [B, T, dim] -> [B, T, hidden]."""
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if self.gelu:  # the activation kernels are SiLU's; inductor fuses this one
            return F.gelu(gate, approximate="tanh") * up
        if self.activation_kernel != "inline" and compiling():
            from infermeter.engine.kernels.swiglu import silu_mul_kernel, swiglu_kernel_usable

            if self.activation_kernel == "triton" and swiglu_kernel_usable(gate):
                return silu_mul_kernel(gate, up)
            return silu_mul(gate, up)
        return F.silu(gate) * up


# (residual, delta, norm) -> (h, norm(h)) with h = residual + delta: the default is
# add_then_norm; tensor parallelism swaps in one that all-reduces delta on the way
# (parallel.use_peer_all_reduce: one kernel for the all-reduce, the add and the norm).
AddNorm = Callable[[Tensor, Tensor, RMSNorm], tuple[Tensor, Tensor]]


def add_then_norm(residual: Tensor, delta: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
    h = residual + delta
    return h, norm(h)


# Whether a compiled one-token step materializes the attention norm's output (see there).
MATERIALIZE_NORM = False

# How a compiled batch-1 step runs a layer: "split" (the default: norms, products, activation
# and adds as today's kernels) or "fused" (kernels/fused_step.py: norm + wqkv + RoPE + cache
# write, wo + add, norm + w13 + SwiGLU (or GeGLU), w2 + add: 4 kernels for 7 and RoPE's and the
# write's).
# Prefill and batch > 1 are always split. A layer starts split; generate's "auto" picks per
# model size (step_choice.py, from benchmarks/step_kernels_ab.py's A/B).
STEP_KERNEL = "split"
# (One launch a layer, and one a model, whose stages waited for each other inside the launch,
# lost to these kernels at every size and were removed on 2026-12-06: docs/engine.md, "One
# launch a layer or a model (tried; removed 2026-12-06)".)
STEP_KERNELS = ("split", "fused")
# The fused step's four kernels, each a part a layer may take (TransformerBlock.fused_parts):
# norm + wqkv (+ q/k norms, RoPE, cache write), wo + residual add, norm + w13 + SwiGLU (or
# GeGLU), w2 + residual add.
FUSED_PARTS = ("attention_in", "attention_out", "ffn_in", "ffn_out")


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        gemma = spec.arch in GEMMA_ARCHS
        norm = norm_class(spec)
        self.attention = Attention(spec, layer)
        self.feed_forward: FeedForward | MoEFeedForward = MoEFeedForward(
            spec.dim, spec.moe_ffn_dim, spec.n_experts, spec.n_active_experts,
            spec.norm_topk_prob, spec.moe_bias, spec.swiglu_alpha, spec.swiglu_limit) \
            if spec.is_moe_layer(layer) else \
            FeedForward(spec.dim, spec.ffn_dim, gelu=gemma)
        self.attention_norm = norm(spec.dim, spec.norm_eps)
        self.ffn_norm = norm(spec.dim, spec.norm_eps)
        # Gemma: norms of attention's and the FFN's outputs, before each residual add.
        self.attention_post_norm = norm(spec.dim, spec.norm_eps) if gemma else None
        self.ffn_post_norm = norm(spec.dim, spec.norm_eps) if gemma else None
        self.materialize_norm = MATERIALIZE_NORM
        self.step_kernels = STEP_KERNEL

    def fused_parts(self) -> tuple[str, ...]:
        """Which of FUSED_PARTS this layer's step can take. attention_in needs wqkv fused;
        attention_out a wo without bias (gpt-oss has one) and no post-norm between it and the
        add (Gemma); ffn_in a dense FFN with w13 fused (SwiGLU, or Gemma's GeGLU; not MoE);
        ffn_out a dense FFN and no post-norm. A layer with hooks on any product takes none
        (tensor parallelism's collectives must come between a product and its residual add)."""
        attention, ffn = self.attention, self.feed_forward
        dense = isinstance(ffn, FeedForward)
        products = [attention.wqkv, attention.wo] + ([ffn.w13, ffn.w2] if dense else [])
        if any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in products):
            return ()
        post = self.attention_post_norm is not None
        takes = {"attention_in": attention.wqkv is not None,
                 "attention_out": attention.wo.bias is None and not post,
                 "ffn_in": dense and ffn.w13 is not None,
                 "ffn_out": dense and not post}
        return tuple(part for part in FUSED_PARTS if takes[part])

    def fuses_step(self) -> bool:
        """Whether this layer runs the whole fused step (all four of FUSED_PARTS)."""
        return len(self.fused_parts()) == len(FUSED_PARTS)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                blocks: BlockLists | None = None,
                ahead: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """ahead: the weights the fused step's four kernels prefetch (Transformer.prefetch_plan),
        or None."""
        if self.step_kernels == "fused" and x.shape[0] * x.shape[1] == 1 \
                and compiling():
            parts = self.fused_parts()
            if parts and fused_step_kernels_usable(x, self.fused_step_params(parts)):
                return self._fused_forward(x, cos, sin, input_pos, parts, ahead)
        normed = self.attention_norm(x)
        # Only a single row (batch 1, one token) becomes a matrix-vector reduction in inductor;
        # larger products go to cuBLAS, which reads a materialized input anyway.
        if self.materialize_norm and x.shape[0] * x.shape[1] == 1 and compiling():
            normed = materialize(normed)
        attended = self.attention(normed, cos, sin, input_pos, blocks=blocks)
        h = x + self._post(self.attention_post_norm, attended)
        return self._split_ffn(h)

    def _split_ffn(self, h: Tensor) -> Tensor:
        """h + the FFN's output (Gemma's post-normed) as its own kernels: h [B, T, dim]."""
        return h + self._post(self.ffn_post_norm, self.feed_forward(self.ffn_norm(h)))

    def _fused_forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                       parts: tuple[str, ...],
                       ahead: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """The batch-1 step x [1, 1, dim] with `parts` (fused_parts) in fused_step.py's kernels
        and the rest as forward's split step runs it; ahead (a whole fused layer's only): what
        its four kernels prefetch."""
        ahead = ahead or (None,) * len(FUSED_PARTS)
        attention_in, ffn_in = "attention_in" in parts, "ffn_in" in parts
        out = self.attention(x if attention_in else self.attention_norm(x), cos, sin, input_pos,
                             norm=self.attention_norm if attention_in else None,
                             residual=x if "attention_out" in parts else None,
                             ahead=ahead[:2])
        h = out if "attention_out" in parts else x + self._post(self.attention_post_norm, out)
        ffn = self.feed_forward
        if not isinstance(ffn, FeedForward):  # MoE: four kernels where it can, else split
            if self.ffn_post_norm is None and ffn.takes_fused_step(h, self.ffn_norm):
                return ffn.fused_step(h, self.ffn_norm)
            return self._split_ffn(h)
        out = self.feed_forward(h if ffn_in else self.ffn_norm(h),
                                norm=self.ffn_norm if ffn_in else None,
                                residual=h if "ffn_out" in parts else None, ahead=ahead[2:])
        return out if "ffn_out" in parts else h + self._post(self.ffn_post_norm, out)

    @staticmethod
    def _post(norm: RMSNorm | None, out: Tensor) -> Tensor:
        """Gemma's post-norm of a block's output, where the layer has one."""
        return out if norm is None else norm(out)

    def products(self) -> list[Tensor]:
        """The weights of the fused step's four products, in step order: wqkv, wo, w13, w2 (a
        layer that fuses_step())."""
        return [self.attention.wqkv.weight, self.attention.wo.weight,
                self.feed_forward.w13.weight, self.feed_forward.w2.weight]

    def fused_step_params(self, parts: tuple[str, ...]) -> list[Tensor]:
        """The weights the fused step's kernels read for `parts` (fused_parts())."""
        attention, ffn = self.attention, self.feed_forward
        read = {"attention_in": lambda: [self.attention_norm.weight, attention.wqkv.weight],
                "attention_out": lambda: [attention.wo.weight],
                "ffn_in": lambda: [self.ffn_norm.weight, ffn.w13.weight],
                "ffn_out": lambda: [ffn.w2.weight]}
        return [weight for part in parts for weight in read[part]()]

    def forward_prenormed(self, x: Tensor, normed: Tensor, cos: Tensor, sin: Tensor,
                          input_pos: Tensor, next_norm: RMSNorm,
                          add_norm: AddNorm) -> tuple[Tensor, Tensor]:
        """The same layer where each residual add comes with the norm after it: x [B, T, dim]
        the residual stream, normed its attention_norm(x) -> (out, next_norm(out))."""
        h, normed = add_norm(x, self.attention(normed, cos, sin, input_pos), self.ffn_norm)
        return add_norm(h, self.feed_forward(normed), next_norm)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_engine_arch(spec)
        check_rope(spec)
        self.spec = spec
        self.tok_embeddings = Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(TransformerBlock(spec, i) for i in range(spec.n_layers))
        self.norm = norm_class(spec)(spec.dim, spec.norm_eps)
        self.prefetch_distance = 0  # a traced fused step's kernels prefetched (prefetch_plan)
        # Gemma multiplies the embeddings by sqrt(dim) rounded to the model dtype, as HF does
        # (bf16: sqrt(3840) = 61.97 becomes 62.0); setup_cache rounds it to the weights' dtype.
        self.embed_scale: float | None = None
        self.post_norms = spec.arch in GEMMA_ARCHS
        self.output = Linear(spec.dim, spec.vocab_size, bias=False)
        self.tie_weights()
        self.max_batch_size = 0
        self.max_seq_len = 0
        # bumped whenever the caches are allocated or freed: a recorded CUDA graph holds the
        # buffers' addresses, which the Generator looks at again only when this moves
        self.cache_version = 0
        self.shard_plan: object | None = None  # set by parallel.shard_model, never read here
        self.tp_collectives: object | None = None  # likewise (parallel.Collectives)
        # Set (by parallel.use_peer_all_reduce), the layers run forward_prenormed with it.
        self.add_norm: AddNorm | None = None

    def tie_weights(self) -> None:
        """With tied embeddings, make output.weight the very Parameter of tok_embeddings."""
        if self.spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # ---- static KV cache -----------------------------------------------------------------
    def setup_cache(self, max_batch_size: int, max_seq_len: int,
                    dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None,
                    layer_buffers: int | None = None) -> None:
        """Allocate every layer's K/V once, plus the RoPE tables for positions < max_seq_len.
        layer_buffers=N: only N caches, layer i's the one of layer i % N (an offloaded decode
        streams each layer's K/V through them: offload/streamed.py); cache_tensors() then
        names a shared cache once per layer that uses it."""
        if max_batch_size <= 0 or max_seq_len <= 0:
            raise InfermeterError(f"cache needs a positive batch and length, got "
                                  f"{max_batch_size} x {max_seq_len}")
        self.cache_version += 1
        shared = len(self.layers) if layer_buffers is None else layer_buffers
        if shared < 1:
            raise InfermeterError(f"layer_buffers must be at least 1, got {layer_buffers}")
        if any(self.spec.layer_window(i) != self.spec.layer_window(i % shared)
               for i in range(len(self.layers))):
            raise InfermeterError(f"model {self.spec.name}: its layers cannot share "
                                  f"{shared} KV caches (their attention windows differ)")
        weight = self.tok_embeddings.weight
        cache_dtype = weight.dtype if dtype is None else torch_dtype(dtype)
        device = weight.device if device is None else torch.device(device)
        if device.type == "meta":
            raise InfermeterError("the model is still on the meta device; load weights first")
        spec = self.spec
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
            if i >= shared:
                layer.attention.kv_cache = self.layers[i % shared].attention.kv_cache
                continue
            layer.attention.kv_cache = LayerKVCache(  # this rank's KV heads under tp
                max_batch_size, max_seq_len, layer.attention.n_kv_heads, spec.head_dim,
                spec.layer_window(i), cache_dtype, device)
        cos, sin = rope_tables(spec, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, head_dim/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        if spec.arch in GEMMA_ARCHS:
            self.embed_scale = torch.tensor(spec.dim ** 0.5, dtype=weight.dtype).item()
        if spec.rope_local_theta is not None:  # the sliding layers' own base, unscaled
            local = spec.with_updates(rope_theta=spec.rope_local_theta, rope_scaling=None)
            cos, sin = rope_tables(local, max_seq_len, device)
            self.register_buffer("rope_cos_local", cos, persistent=False)
            self.register_buffer("rope_sin_local", sin, persistent=False)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def _caches(self) -> list[LayerKVCache]:
        caches = [layer.attention.kv_cache for layer in self.layers]
        if any(c is None for c in caches):
            raise InfermeterError("call setup_cache() before using the KV cache")
        return caches  # type: ignore[return-value]

    def cache_tensors(self) -> list[Tensor]:
        """[layer0.k, layer0.v, layer1.k, ...]: the allocated tensors themselves, not copies."""
        return [t for cache in self._caches() for t in (cache.k, cache.v)]

    def cache_bytes(self) -> int:
        """Equals kvsize.kv_cache_bytes(spec, max_batch_size, max_seq_len, cache dtype, tp)."""
        return sum(t.nbytes for t in self.cache_tensors())

    @property
    def cache_dtype(self) -> torch.dtype:
        return self._caches()[0].k.dtype

    def reset_cache(self) -> None:
        for cache in self._caches():
            cache.reset()

    def drop_cache(self) -> None:
        """Free the KV cache (whole, or layer buffers): the next setup_cache, or
        Generator.prepare, allocates a new one (with the shape unchanged it would otherwise
        keep the old one)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_len = 0
        self.cache_version += 1

    # ---- forward -------------------------------------------------------------------------
    def forward(self, tokens: Tensor, input_pos: Tensor,
                block_fn: Callable[..., Tensor] | None = None,
                blocks: BlockLists | None = None, rows: Tensor | None = None) -> Tensor:
        """tokens [B, T] int64, input_pos [T] int64 -> logits [B, T, vocab] float32.

        Writes the K/V of these positions into the cache. No host syncs or value-dependent
        branches, so T == 1 decode compiles with fullgraph=True and static shapes.
        block_fn(layer, h, cos, sin, input_pos, blocks), when given, runs each layer instead
        of layer(h, ...): the Generator's compiled prefill passes one compiled function here,
        which every layer then shares (one graph, any prompt length). blocks: a later
        compiled prefill chunk's tile lists for flex attention (chunk_attention.py).
        rows: int64 [R] indices into T: only those rows get the final norm and the output
        projection -> logits [B, R, vocab] (a prefill samples one row; R = 0 computes none,
        for a chunk before the last). A tensor, so one compiled graph serves any row.
        """
        if self.max_seq_len == 0:
            raise InfermeterError("call setup_cache() before running the model")
        cos, sin = self._rope_rows(self.rope_cos, self.rope_sin, input_pos)  # [T, head_dim/2]
        local = self._rope_rows(self.rope_cos_local, self.rope_sin_local, input_pos) \
            if self.spec.rope_local_theta is not None else (cos, sin)
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.add_norm is not None:
            if block_fn is not None:
                raise InfermeterError("a compiled prefill (block_fn) cannot run a model whose "
                                      "adds are fused with its norms (add_norm)")
            if self.post_norms:
                raise InfermeterError(f"model {self.spec.name}: its norms after attention and "
                                      "FFN come before the residual add, so the all-reduce "
                                      "cannot be fused with add and norm (use NCCL's)")
            normed = self._forward_prenormed(h, cos, sin, input_pos, self.add_norm)
            return self._logits(normed if rows is None else normed.index_select(1, rows))
        plan = self.prefetch_plan(h) if block_fn is None else None
        for index, layer in enumerate(self.layers):
            c, s = local if layer.attention.local_rope else (cos, sin)
            h = layer(h, c, s, input_pos, blocks, plan and plan[index]) if block_fn is None \
                else block_fn(layer, h, c, s, input_pos, blocks)
        final = h if rows is None else h.index_select(1, rows)  # [B, R, dim]
        if tokens.shape[1] == 1 and self.fuses_head(final):  # a decode step, not a prefill
            from infermeter.engine.kernels.fused_step import norm_matvec

            logits = norm_matvec(final.view(1, -1), self.norm.weight, self.output.weight,
                                 self.norm.eps, isinstance(self.norm, GemmaRMSNorm))
            return self._capped(logits.view(1, 1, -1).float())
        return self._logits(self.norm(final))

    def fuses_head(self, x: Tensor) -> bool:
        """Whether the compiled batch-1 step x [1, 1, dim] runs its final norm and the output
        head as one kernel (fused_step's norm + GEMV, as a layer's norm + w13): FUSED_HEAD on,
        some layer on the fused step, a head without bias or hooks (tensor parallelism gathers
        its vocabulary shards), where the fused kernels run."""
        return (x.shape[0] * x.shape[1] == 1 and compiling() and self.head_fuses()
                and fused_step_kernels_usable(x, [self.norm.weight, self.output.weight]))

    def head_fuses(self) -> bool:
        """fuses_head's rules that hold for every step: FUSED_HEAD on, some layer on the fused
        step, a head without bias or hooks."""
        head = self.output
        return (checked_way(FUSED_HEAD, "FUSED_HEAD", FUSED_HEAD_WAYS) == "on"
                and any(layer.step_kernels == "fused" for layer in self.layers)
                and head.bias is None and not (head._forward_hooks or head._forward_pre_hooks))

    def _rope_rows(self, cos_table: Tensor, sin_table: Tensor,
                   input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin rows at input_pos [T] -> [T, head_dim/2] each. In a compiled
        one-token step with fused layers, where Triton runs, gathered once by one kernel
        inductor cannot see into (kernels/rope_rows.py says why); elsewhere indexed, for
        inductor to fuse where it may."""
        if input_pos.shape[0] == 1 and compiling() and \
                any(layer.step_kernels == "fused" for layer in self.layers):
            from infermeter.engine.kernels.triton_support import triton_runs_on

            if triton_runs_on(cos_table):
                from infermeter.engine.kernels.rope_rows import rope_rows

                return rope_rows(cos_table, sin_table, input_pos)
        return cos_table[input_pos], sin_table[input_pos]

    def prefetch_plan(self, x: Tensor) -> list[tuple[Tensor | None, ...]] | None:
        """What each fused kernel of the compiled batch-1 step x [1, 1, dim] prefetches into L2
        (kernels/prefetch.py): per layer, for its four kernels (FUSED_PARTS' order), the weight
        of the product prefetch.DISTANCE kernels on in the chain wqkv, wo, w13, w2 of each layer
        and then the output head's (None past it). None (no prefetch) where the distance is 0,
        off a compiled batch-1 step, or where any layer is not the whole fused step
        (step_kernels "fused" and fuses_step(): the chain is then not these four kernels)."""
        from infermeter.engine.kernels import prefetch

        distance = prefetch.DISTANCE
        if distance == 0 or x.shape[0] * x.shape[1] != 1 or not compiling() \
                or not all(layer.step_kernels == "fused" and layer.fuses_step()
                           for layer in self.layers):
            return None
        chain = [weight for layer in self.layers for weight in layer.products()]
        chain.append(self.output.weight)
        ahead = [chain[i + distance] if i + distance < len(chain) else None
                 for i in range(len(chain) - 1)]
        self.prefetch_distance = distance  # traced so: the runner's record of what ran
        width = len(FUSED_PARTS)
        return [tuple(ahead[i:i + width]) for i in range(0, len(ahead), width)]

    def _logits(self, normed: Tensor) -> Tensor:
        """[B, R, dim] final-normed -> [B, R, vocab] float32, soft-capped where the model is."""
        return self._capped(self.output(normed).float())

    def _capped(self, logits: Tensor) -> Tensor:
        """float32 logits, soft-capped where the model is (Gemma 2)."""
        cap = self.spec.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _forward_prenormed(self, h: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                           add_norm: AddNorm) -> Tensor:
        """forward with add_norm: every residual add is done together with the next norm (the
        next layer's attention norm, or the final one) -> the final-normed rows [B, T, dim]."""
        normed = self.layers[0].attention_norm(h)
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) \
                else self.norm
            h, normed = layer.forward_prenormed(h, normed, cos, sin, input_pos, following,
                                                add_norm)
        return normed


@contextmanager
def prefill_from(model: Transformer, start: int | None) -> Iterator[None]:
    """Within it, each layer's multi-token forward starts at position `start` (a Python int:
    every distinct value is its own compiled graph) and attends only to what it can see; None,
    as outside it: over the whole cache with a mask (one graph whatever the start)."""
    for layer in model.layers:
        layer.attention.prefill_start = start
    try:
        yield
    finally:
        for layer in model.layers:
            layer.attention.prefill_start = None


def set_step_kernels(model: Transformer, kind: str) -> None:
    """Every layer of `model` runs its compiled batch-1 step as `kind` (STEP_KERNELS)."""
    if kind not in STEP_KERNELS:
        raise ValueError(f"unknown step kernels {kind!r} (use {STEP_KERNELS})")
    if kind != "fused":
        model.prefetch_distance = 0
    for layer in model.layers:
        if layer.step_kernels != kind:  # same kind (a runner sharing compiled steps): kept
            if isinstance(layer.feed_forward, MoEFeedForward):
                layer.feed_forward.took_fused_step = False
        layer.step_kernels = kind


def fused_step_layers(model: Transformer) -> int:
    """How many layers a compiled batch-1 step runs wholly fused (step_kernels "fused" and
    fuses_step())."""
    return sum(layer.step_kernels == "fused" and layer.fuses_step()
               for layer in model.layers)


def fused_step_parts(model: Transformer) -> int:
    """How many of the layers' FUSED_PARTS a compiled batch-1 step runs fused (of
    len(FUSED_PARTS) x layers)."""
    return sum(len(layer.fused_parts()) for layer in model.layers
               if layer.step_kernels == "fused")


def build_model(spec: ModelSpec, device: torch.device | str = "cpu",
                dtype: torch.dtype | str = torch.float32, on_meta: bool = False,
                seed: int = 0) -> Transformer:
    """A Transformer for `spec`, without a KV cache (call setup_cache).

    on_meta=True: parameters on the meta device (no memory), for a loader to fill with
    load_state_dict(assign=True). Otherwise: allocated on `device` in `dtype` once (no float32
    detour) and filled with seeded random weights (random_weights.py).
    Parameters never require grad: this is an inference engine.
    """
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype=torch_dtype(dtype)).requires_grad_(False)
    if on_meta:
        return model
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty keeps the sharing, but be explicit
    init_random_weights(model, seed=seed)
    return model
