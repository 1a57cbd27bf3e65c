"""Mixture-of-experts FFN (Mixtral, Qwen3-MoE, gpt-oss): a router and E SwiGLU experts stored
stacked.

Parameters (Meta-style names under the layer's feed_forward):
  gate.weight  [E, dim]        the router (replicated under tensor parallelism)
  w1.weight    [E, ffn, dim]   every expert's gate projection, stacked
  w3.weight    [E, ffn, dim]   every expert's up projection
  w2.weight    [E, dim, ffn]   every expert's down projection
  gate.bias [E], w1.bias / w3.bias [E, ffn], w2.bias [E, dim]   gpt-oss only (spec.moe_bias;
  under tensor parallelism w1's and w3's are split with their rows, w2's added by rank 0 only)
Routing (transformers' MixtralTopKRouter and Qwen3MoeTopKRouter): softmax over all E router
logits in float32, the top k, renormalised over the k where spec.norm_topk_prob (Mixtral
always), cast back to the activations' dtype. gpt-oss (GptOssTopKRouter): the top k of the
biased logits, then a softmax over those k (float32 here). With moe_kernel "triton" (wherever
the Triton experts run) kernels/router_topk.py computes all of it in one kernel, in the order
of torch's CUDA kernels (the same bits): torch.topk alone is two CUDA kernels, 9.1 us a layer
(medians) at E = 128 on an H100 (results/traces-moe-qwen3-nvidia-h100-80gb-hbm3/).
gpt-oss's experts (GptOssExperts): biased products and a clamped SwiGLU, gate.clamp(max=limit),
up.clamp(-limit, limit), (up + 1) * gate * sigmoid(alpha * gate); the gathered and the grouped
Triton kernels compute both (HAS_BIAS, CLAMPED), so with moe_kernel "triton" such a block runs
Triton at every token count, as a plain SwiGLU block does.

Three ways to run the experts, the same numbers:
- gathered (N*k <= E: batch-1 decode and small batches): index the stacked weights by the
  [N, k] routing ids and run one batched product, so a step reads only the chosen experts'
  matrices and nothing depends on the routing's values (static shapes, compiles with
  fullgraph=True); the index is a copy [N, k, ffn, dim] (eagerly: each pair's matrices read,
  written, read again by the product; an expert two tokens chose, copied twice);
- grouped (more tokens, eager: prefill): sort the N*k (token, expert) pairs by expert, run each
  touched expert once on its tokens, scatter back weighted (index_add_); the loop over touched
  experts syncs with the host, which a long prefill amortises;
- every expert (a compiled decode step of more tokens, fullgraph: no host sync): each expert on
  every token, weighted by the [N, E] routing weights (zero where unrouted); reads every
  expert once, as a batch whose union is near E does anyway.
With moe_kernel "triton" (MOE_KERNELS), wherever Triton runs, eager and compiled, two of them
have a Triton implementation with the same rounding points:
- gathered: kernels/expert_gemv.py's kernels read the chosen experts' rows straight from the
  stacked weights by id (no gathered copy; an expert several tokens chose, once);
- grouped and every expert (N*k > E): kernels/expert_gemm.py groups the pairs by expert with
  static shapes (each expert's group padded to a block) and runs each block's expert on its
  tokens: no host sync, so it compiles (fullgraph) and an MoE model can prefill through the
  compiled bucketed graphs (prefills_without_sync, the Generator's rule), gpt-oss's included.
The default, "auto" (MOE_KERNEL), takes the Triton kernels at one token and past E / k tokens
and torch's gathered indexing between, as measured (benchmarks/moe_kernel_ab.py).
`last_experts` keeps the last forward's routing ids [N, k] (a reference, no copy, no sync):
`touched_experts` turns it into the set a step read, for the roofline's byte count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infermeter.engine.kernels.triton_support import triton_runs_on
from infermeter.engine.linear import Linear
from infermeter.engine.opaque_ops import compiling
from infermeter.specs.expert_memory import takes_triton, uses_triton

if TYPE_CHECKING:
    from infermeter.engine.norms import RMSNorm


# The expert kernels' modules are imported when a block takes them: importing one registers
# its torch.library ops, which pulls in dynamo and inductor (seconds) that a process running
# the torch experts never needs.
def experts_kernel_usable(x: Tensor, *weights: Tensor | None) -> bool:
    from infermeter.engine.kernels import expert_gemv

    return expert_gemv.experts_kernel_usable(x, *weights)


def gathered_experts(*args: Any, **kwargs: Any) -> Tensor:
    """kernels/expert_gemv.py's gathered_experts (its arguments)."""
    from infermeter.engine.kernels import expert_gemv

    return expert_gemv.gathered_experts(*args, **kwargs)


def grouped_experts(*args: Any, **kwargs: Any) -> Tensor:
    """kernels/expert_gemm.py's grouped_experts (its arguments)."""
    from infermeter.engine.kernels import expert_gemm

    return expert_gemm.grouped_experts(*args, **kwargs)


def kernel_route(logits: Tensor, top_k: int, renormalize: bool,
                 softmax_after_topk: bool) -> tuple[Tensor, Tensor] | None:
    """kernels/router_topk.py's route of the router's logits [N, E] (weights, ids), or None
    where its kernel cannot run on them."""
    from infermeter.engine.kernels import router_topk

    if not router_topk.route_usable(logits, top_k):
        return None
    return router_topk.route(logits, top_k, renormalize, softmax_after_topk)


# How a forward runs its experts: "torch" (index the stacked weights, batched products; past
# E / k tokens the grouped loop), "triton" (kernels/expert_gemv.py's gathered kernels by expert
# id while N*k <= E, expert_gemm.py's grouped ones past that), or "auto", the default since
# 2026-12-06: Triton's at one token and past E / k tokens, torch's gathered indexing between
# (uses_triton), except at a count the GPU has measured tiles for (EXPERT_TOKEN_TILES, where
# Triton's gather too). Measured on an H100 at Qwen3-30B-A3B, each pair in one process
# (benchmarks/moe_kernel_ab.py): at batch 1 Triton's step took 0.879x torch's TPOT
# (results/moe-kernel-ab-nvidia-h100-80gb-hbm3.jsonl), at batch 4 1.41x with the batch-1
# tiles (results/moe-kernel-batches-nvidia-h100-80gb-hbm3.jsonl) and 0.949x with the four-token
# ones (results/moe-kernel-token-tiles-nvidia-h100-80gb-hbm3.jsonl), and its grouped
# kernels' compiled bucketed prefill of 4 x 80 tokens took 21.5 ms against torch's exact
# 410 ms. Where Triton cannot run, "triton" and "auto" run torch's. The rule itself is
# specs/expert_memory.uses_triton, which the fit checks and the report read too.
MOE_KERNEL = "auto"
MOE_KERNELS = ("auto", "torch", "triton")


class StackedExperts(nn.Module):
    """One weight [E, out, in] holding E experts' matrices of one projection (and, with bias,
    their biases [E, out])."""

    def __init__(self, n_experts: int, out_features: int, in_features: int,
                 bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n_experts, out_features)) if bias else None


class MoEFeedForward(nn.Module):
    trace_label = "experts"  # --trace's range around the whole block (router, experts)

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int,
                 renormalize: bool, bias: bool = False, swiglu_alpha: float | None = None,
                 swiglu_limit: float | None = None) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.gate = Linear(dim, n_experts, bias=bias)
        self.w1 = StackedExperts(n_experts, hidden, dim, bias)
        self.w3 = StackedExperts(n_experts, hidden, dim, bias)
        self.w2 = StackedExperts(n_experts, dim, hidden, bias)
        # gpt-oss: the router's top k, then their softmax; the clamped SwiGLU (activation)
        self.softmax_after_topk = bias
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.last_experts: Tensor | None = None  # [N, k] routing ids of the last forward
        self.took_fused_step = False  # a traced batch-1 step ran the four kernels (fused_step)
        self.moe_kernel = MOE_KERNEL
        # Token counts past one that this GPU has measured expert tiles for, where "auto" takes
        # the Triton kernels too (note_token_tiles; set outside any compiled region)
        self.tiled_tokens: frozenset[int] = frozenset()
        # False: w2's bias [E, dim] is kept but not added. Under tensor parallelism the block's
        # output is all-reduced, so only rank 0 adds it (sharding.py); w1's and w3's are split.
        self.adds_down_bias = True

    @property
    def down_bias(self) -> Tensor | None:
        """w2's bias [E, dim] where this block adds it (gpt-oss's; rank 0's under tp), else
        None."""
        return self.w2.bias if self.adds_down_bias else None

    def activation(self, gate: Tensor, up: Tensor) -> Tensor:
        """SwiGLU, or gpt-oss's clamped one: any shape, the gate's and up's elementwise."""
        if self.swiglu_limit is None:
            return F.silu(gate) * up
        limit, alpha = self.swiglu_limit, self.swiglu_alpha or 1.0
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, dim] -> (weights [N, k] in x's dtype, expert ids [N, k] int64); with the
        Triton experts, kernels/router_topk.py's one kernel (the same numbers on a GPU)."""
        logits = self.gate(x)  # [N, E]
        if self.runs_kernels(x):
            routed = kernel_route(logits, self.top_k, self.renormalize, self.softmax_after_topk)
            if routed is not None:
                return routed[0].to(x.dtype), routed[1]
        if self.softmax_after_topk:
            top, ids = torch.topk(logits.float(), self.top_k, dim=-1)
            return torch.softmax(top, dim=-1).to(x.dtype), ids
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, dim]
        weights, ids = self.route(flat)
        self.last_experts = ids
        if flat.shape[0] * self.top_k <= self.n_experts:
            out = self.gathered(flat, weights, ids)
        elif self.runs_kernels(flat):  # grouped: static shapes, no host sync, eager and compiled
            out = grouped_experts(flat, weights, ids, *self.stacked(), self.swiglu_limit,
                                  self.swiglu_alpha or 1.0)
        elif compiling() and shape[-2] == 1:  # a compiled decode step: no host sync
            out = self.every_expert(flat, weights, ids)
        else:
            out = self.grouped(flat, weights, ids)
        return out.reshape(shape)

    def gathered(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Each token's k experts by index: [N, k, ffn, dim] gathered rows, batched products;
        where runs_kernels says so ("triton", "auto" at one token) the kernels read the rows by
        id instead."""
        if self.runs_kernels(x):
            return gathered_experts(x, weights, ids, *self.stacked(), self.swiglu_limit,
                                    self.swiglu_alpha or 1.0)
        xs = x[:, None, :, None]  # [N, 1, dim, 1]
        gate = (self.w1.weight[ids] @ xs).squeeze(-1)  # [N, k, ffn]
        up = (self.w3.weight[ids] @ xs).squeeze(-1)
        if self.w1.bias is not None:
            gate, up = gate + self.w1.bias[ids], up + self.w3.bias[ids]
        act = self.activation(gate, up).unsqueeze(-1)  # [N, k, ffn, 1]
        down = (self.w2.weight[ids] @ act).squeeze(-1)  # [N, k, dim]
        if self.down_bias is not None:
            down = down + self.down_bias[ids]
        return (down * weights.unsqueeze(-1)).sum(dim=1)

    def stacked(self) -> tuple[Tensor | None, ...]:
        """(w1, w3, w2 weights, then their biases: gpt-oss's, else None), as the expert kernels
        take them."""
        return (self.w1.weight, self.w3.weight, self.w2.weight, self.w1.bias, self.w3.bias,
                self.down_bias)

    def takes_fused_step(self, h: Tensor, norm: RMSNorm) -> bool:
        """Whether the fused batch-1 step of h [1, 1, dim] runs this block, its norm (`norm`,
        the layer's ffn_norm) and its residual add as fused_step's four kernels: the Triton
        experts (runs_kernels), a router the routing kernel
        takes, the norm's and router's weights as the kernels read them (h's dtype, unit column
        stride), no hook on the block or its router (tensor parallelism's all-reduce must come
        before the residual add), and none of gpt-oss's biases, clamped SwiGLU or
        top-k-then-softmax."""
        from infermeter.engine.kernels.router_topk import MAX_EXPERTS

        flat = h.reshape(-1, h.shape[-1])
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (self, self.gate))
        return (flat.shape[0] == 1 and not hooked and self.runs_kernels(flat)
                and self.gate.bias is None and self.w1.bias is None
                and self.swiglu_limit is None and not self.softmax_after_topk
                and self.n_experts <= MAX_EXPERTS
                and all(w.dtype == h.dtype and w.stride(-1) == 1
                        for w in (self.gate.weight, norm.weight)))

    def fused_step(self, h: Tensor, norm: RMSNorm) -> Tensor:
        """The fused batch-1 step's block (step_kernels "fused", for takes_fused_step's
        blocks): h + this block's output for h [1, 1, dim] normed by `norm` (the layer's
        ffn_norm) in four kernels where the split step takes six (the add and norm, the
        router's product, the routing, the two expert products, the residual add): the norm
        and the router's product, which also stores the normed row (fused_step.
        norm_gemv_keeping); the routing kernel; the experts' gate and up; the down product
        with the residual add in it. The routed ids noted as a forward notes them."""
        from infermeter.engine.kernels.fused_step import norm_matvec_keeping
        from infermeter.engine.norms import GemmaRMSNorm

        flat = h.reshape(1, -1)
        logits, normed = norm_matvec_keeping(flat, norm.weight, self.gate.weight, norm.eps,
                                             isinstance(norm, GemmaRMSNorm))  # [1, E], [1, dim]
        routed = kernel_route(logits, self.top_k, self.renormalize, self.softmax_after_topk)
        if routed is None:  # takes_fused_step's blocks always route in the kernel
            raise RuntimeError("the routing kernel cannot run on this block's router")
        weights, ids = routed
        self.last_experts = ids
        self.took_fused_step = True  # traced so: the runner's record of what ran
        out = gathered_experts(normed, weights.to(h.dtype), ids, *self.stacked(),
                               residual=flat)
        return out.view_as(h)

    def runs_kernels(self, x: Tensor) -> bool:
        """Whether a forward of x [N, dim] runs the Triton expert kernels (expert_gemv.py's
        gathered ones while N * k <= E, expert_gemm.py's grouped ones past that): moe_kernel
        "triton", or "auto" at one row, at a tiled count (tiled_tokens) and past E / k rows
        (uses_triton), and they can run on x and the stacked weights (and biases)."""
        return self.picks_triton(x.shape[0]) and experts_kernel_usable(x, *self.stacked())

    def picks_triton(self, n_tokens: int) -> bool:
        """The rule alone (uses_triton) for a forward of n_tokens rows: moe_kernel, the
        routing's shape and whether this GPU has measured tiles at that count."""
        return uses_triton(self.moe_kernel, n_tokens, self.top_k, self.n_experts,
                           n_tokens in self.tiled_tokens)

    def every_expert(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Each expert on every token: [N, E, ffn] activations, weighted by [N, E] routing."""
        routing = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        routing = routing.scatter(1, ids, weights)  # [N, E]
        gate = torch.einsum("nd,efd->nef", x, self.w1.weight)
        up = torch.einsum("nd,efd->nef", x, self.w3.weight)
        if self.w1.bias is not None:
            gate, up = gate + self.w1.bias, up + self.w3.bias
        act = self.activation(gate, up) * routing.unsqueeze(-1)
        out = torch.einsum("nef,edf->nd", act, self.w2.weight)
        # each token's down biases, weighted as its experts' outputs are: [N, E] @ [E, dim]
        return out if self.down_bias is None else out + routing @ self.down_bias

    def grouped(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Tokens sorted by expert; each touched expert runs once on its rows."""
        flat_ids = ids.reshape(-1)  # [N*k]: pair p is token p // k's (p % k)-th choice
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        tokens = order // self.top_k
        pair_weights = weights.reshape(-1)[order].unsqueeze(-1)  # [N*k, 1]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            h = x[rows]  # [count, dim]
            gate, up = h @ self.w1.weight[expert].T, h @ self.w3.weight[expert].T
            if self.w1.bias is not None:
                gate, up = gate + self.w1.bias[expert], up + self.w3.bias[expert]
            down = self.activation(gate, up) @ self.w2.weight[expert].T
            if self.down_bias is not None:
                down = down + self.down_bias[expert]
            out.index_add_(0, rows, down * pair_weights[start:start + count])
            start += count
        return out


def set_moe_kernel(model: nn.Module, kind: str) -> None:
    """Every MoE block of `model` runs its gathered experts with `kind` (MOE_KERNELS)."""
    if kind not in MOE_KERNELS:
        raise ValueError(f"unknown MoE kernel {kind!r} (use {MOE_KERNELS})")
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.moe_kernel = kind


def takes_expert_kernel(module: MoEFeedForward, n_tokens: int) -> bool:
    """Whether a forward of n_tokens through `module` runs Triton kernels: its kind takes them
    at that count (uses_triton) and Triton runs where the weights are (expert_gemv.py's
    gathered kernels while N * k <= E, expert_gemm.py's grouped ones past that; both compute
    every block's experts, gpt-oss's biases and clamped SwiGLU included). forward's rule,
    without the input's layout (the engine's rows meet it); the generation runner records what
    ran with it."""
    return module.picks_triton(n_tokens) and triton_runs_on(module.w1.weight)


def note_token_tiles(model: nn.Module) -> None:
    """Each MoE block's tiled_tokens: the token counts past one for which its weights' GPU has
    measured tiles of both expert kernels at its widths (expert_gemv.tiled_token_counts), where
    "auto" runs the Triton kernels. Read once here, outside any compiled region (the GPU's name
    is a host query); empty off a GPU."""
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            weight = module.w1.weight
            module.tiled_tokens = frozenset()
            if weight.is_cuda:
                from infermeter.engine.kernels import expert_gemv

                module.tiled_tokens = expert_gemv.tiled_token_counts(
                    weight.device, weight.shape[-1], weight.shape[-2])


def prefills_without_sync(model: nn.Module) -> bool:
    """Whether every MoE block of `model` runs a long forward (N * k > E) without a host sync,
    through expert_gemm.py's grouped kernels (the engine keeps the weights in the activations'
    dtype; shorter forwards gather, with no sync either way): what lets an MoE model prefill
    through the compiled bucketed graphs. True for a model without MoE blocks."""
    return all(takes_triton(module.moe_kernel) and triton_runs_on(module.w1.weight)
               for module in model.modules() if isinstance(module, MoEFeedForward))


def touched_experts(module: MoEFeedForward) -> Tensor:
    """The distinct expert ids the module's last forward used (sorted, on its device)."""
    if module.last_experts is None:
        return torch.empty(0, dtype=torch.int64)
    return torch.unique(module.last_experts)
