"""Runners of one case's mode behind one interface: warmup(shapes) once, then run(tokens, hook)
per timed run, returning the engine's GenerationOutput. compiled and eager run the engine's
Generator; hf and hf-eager run transformers (generation_hf.py) on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from infermeter.engine import generator as generator_module
from infermeter.engine import sampling
from infermeter.engine.dtypes import torch_dtype
from infermeter.engine.generator import GenerationOutput, Generator
from infermeter.engine.kernels.pdl import resolve as resolve_pdl
from infermeter.engine.kernels.triton_support import triton_runs_on
from infermeter.engine.linear import set_matvec_kernel, takes_gemv
from infermeter.engine.model import (
    FUSED_PARTS,
    FeedForward,
    Transformer,
    fused_step_parts,
    set_step_kernels,
)
from infermeter.engine.moe import MoEFeedForward, set_moe_kernel, takes_expert_kernel
from infermeter.engine.step_choice import (
    AUTO,
    attention_release_way,
    choose_step,
    step_weight_bytes,
)
from infermeter.generate.cases import Case
from infermeter.generate.request import GenerateRequest
from infermeter.measure.nvtx import cuda_ready, nvtx_range, range_pop, range_push
from infermeter.specs.expert_memory import takes_triton


class EngineRunner:
    """The engine's Generator with a cache of the case's length, eager or compiled."""

    def __init__(self, model: Transformer, case: Case, request: GenerateRequest) -> None:
        engine = request.engine
        self.config = replace(request.sampling, compile=case.mode == "compiled")
        # the step's kernels and replay: "auto" by the bytes a step reads (step_choice.py),
        # decided here since the rule needs the built model, the case's batch and the ranks
        facts = (step_weight_bytes(model), model.tok_embeddings.weight.device,
                 model.spec.n_experts > 0, request.tp or 1, case.largest_group,
                 engine.compile_backend)
        # an MoE model's fused batch-1 step was measured with q/k norms and the Triton experts
        fuses = model.spec.qk_norm and takes_triton(engine.moe_kernel)
        choice = choose_step(*facts, engine.step_kernels, moe_fuses=fuses)
        default = choose_step(*facts, moe_fuses=fuses)
        step_kernels = choice.kernels
        step_graphs = choice.graphs if engine.step_graphs == AUTO else engine.step_graphs
        self.generator = Generator(model, case.cache_len, kv_dtype=request.kv_dtype,
                                   compile_backend=engine.compile_backend,
                                   compile_prefill=engine.compile_prefill,
                                   prefill_chunk=engine.chunk_for(case.mode),
                                   bucketed_prefill=engine.prefill_kind == "bucketed",
                                   chunk_attention=engine.chunk_attention,
                                   prefill_graphs=engine.prefill_graphs,
                                   step_graphs=step_graphs,
                                   decode_attention=engine.decode_attention,
                                   compile_options=dict(engine.compile_options),
                                   pdl=self.config.compile and resolve_pdl(
                                       engine.pdl, model.tok_embeddings.weight.device,
                                       engine.compile_backend))
        # the Result's config.step_choice: the default's reason ("auto: ...", the report's
        # default-setting test) where the step runs what the default would, kernels and replay
        # (the Generator's, which holds MoE and the cudagraphs backend to the trees), else
        # the asked kernels' ("asked: ...", with why they stay in the trees if they do)
        ran = self.generator.step_graphs or "trees"  # off a GPU: no graph, as the rule says
        self.step_choice = default.reason if (step_kernels, ran) == \
            (default.kernels, default.graphs) else choice.reason if ran == choice.graphs \
            else f"asked: {step_kernels}, {ran}"
        set_matvec_kernel(model, engine.matvec_kernel)  # after the Generator fused w13/wqkv
        self.matvec_kernel = engine.matvec_kernel
        set_step_kernels(model, step_kernels)
        set_moe_kernel(model, engine.moe_kernel)
        self.moe_kernel_asked = engine.moe_kernel
        # one-shot all-reduces are inductor's lowering: only the compiled step has them;
        # "triton" (peer_all_reduce.py, set on the model) runs in eager steps too
        self.all_reduce = None if (request.tp or 1) == 1 else \
            engine.tp_all_reduce if self.config.compile or "triton" in engine.tp_all_reduce \
            else "nccl"
        self.batch_sizes: list[int] = []  # warmup() learns them: the attention depends on it
        self.prompt_lens: list[int] = []  # likewise: the prefill's forward lengths

    def describe(self) -> dict[str, Any]:
        compiled = self.config.compile
        used = dict.fromkeys(self.generator.decode_attention_used(compiled, batch)
                             for batch in self.batch_sizes)  # one kind unless batches differ
        return {"compile_backend": self.generator.compile_backend if compiled else None,
                "compile_prefill": compiled and self.generator.compile_prefill,
                "decode_attention": "/".join(map(str, used)) or None,
                "tp_all_reduce": self.all_reduce, "matvec_kernel": self._matvec_used(),
                "step_kernels": self._step_kernels_used(), "fused_rope": self._fused_rope_used(),
                "qk_norm_kernels": self._qk_norm_kernels_used(),
                "prefetch": self._prefetch_used(),
                **self._attention_launch_used(used),
                "attention_unsplit": self._unsplit_used(used),
                **self._fused_tiles_used(),
                "early_release": self._early_release_used(),
                "attention_release": self._attention_release_used(),
                "attention_release_asked": self._attention_release_asked(),
                "fused_head": self._fused_head_used(),
                "argmax_parts": sampling.ARGMAX_PARTS,
                "silu_block": self._silu_block_used(),
                "compile_tuning": self._compile_tuning_used(),
                "moe_kernel": self._moe_kernel_used(),
                "moe_kernel_asked": self.moe_kernel_asked if self._moe_blocks() else None,
                "moe_fused_step": self._moe_fused_step_used(),
                "pdl": self.generator.pdl, "prefill_chunk": self.generator.prefill_chunk,
                "step_graphs": self.generator.step_graphs if compiled else None,
                "step_choice": self.step_choice if compiled else None,
                **self._prefill_used()}

    def _prefill_used(self) -> dict[str, Any]:
        """prefill: "bucketed" where the compiled mode padded to static graphs, else "exact";
        prefill_forward_lens: the forward lengths the case's prefills ran (one graph each when
        bucketed), after warmup() prepared the cache; chunk_attention: how a bucketed chunk
        from a later start attended ("mask" or "flex"), None where no prefill had one;
        prefill_graphs: how the bucketed forwards were compiled ("static", "dynamic" or
        "layer"), None where the prefill was exact."""
        gen, compiled = self.generator, self.config.compile
        forwards = [gen.prefill_lengths(length, compiled) for length in self.prompt_lens]
        lens = sorted({n for lengths in forwards for n in lengths})
        bucketed = compiled and gen.bucketed_prefill
        # the chunk attention only where a bucketed chunk starts after position 0
        later = bucketed and any(len(lengths) > 1 for lengths in forwards)
        return {"prefill": "bucketed" if bucketed else "exact", "prefill_forward_lens": lens,
                "chunk_attention": gen.chunk_attention if later else None,
                "prefill_graphs": gen.prefill_graphs if bucketed else None}

    def _matvec_used(self) -> str | None:
        """The compiled step's one-row products: "triton" where a case's batch of 1 takes the
        GEMV (linear.takes_gemv, Linear's own rule), else inductor's; None in eager mode."""
        if not self.config.compile:
            return None
        weight = self.generator.model.output.weight
        gemv = any(takes_gemv(self.matvec_kernel, batch, weight) for batch in self.batch_sizes)
        return "triton" if gemv else "inductor"

    def _step_kernels_used(self) -> str | None:
        """The compiled batch-1 step's layers: "fused" where every layer took all four of
        fused_step.py's kernels (a batch of 1, Triton runs, model.TransformerBlock.fused_parts),
        "partly fused" where some took some (a Gemma layer its norm + wqkv, an MoE layer its
        attention's two), else "split"; None in eager mode."""
        if not self.config.compile:
            return None
        model = self.generator.model
        runs = 1 in self.batch_sizes and triton_runs_on(model.output.weight)
        fused = fused_step_parts(model) if runs else 0
        return "split" if fused == 0 else "fused" \
            if fused == len(FUSED_PARTS) * len(model.layers) else "partly fused"

    def _fused_rope_used(self) -> bool | None:
        """Whether the fused step's wqkv kernel also ropes q and k and writes the cache: True
        where every fused layer's does (Attention.ropes_in_wqkv; Qwen3's q/k norms too), False
        where some layer's RoPE and cache write stay in torch (a cache of another dtype, q/k
        norms over a head_dim that is not a power of two); None where no layer runs fused
        (step_kernels None or "split")."""
        if self._step_kernels_used() in (None, "split"):
            return None
        model, gen = self.generator.model, self.generator
        dtype = model.tok_embeddings.weight.dtype
        cache_dtype = dtype if gen.kv_dtype is None else torch_dtype(gen.kv_dtype)
        return all(layer.attention.ropes_in_wqkv(dtype, cache_dtype) for layer in model.layers
                   if layer.step_kernels == "fused"
                   and "attention_in" in layer.fused_parts())

    def _prefetch_used(self) -> int | None:
        """How far ahead the fused step's kernels prefetched weights into L2 (kernels/
        prefetch.py, Transformer.prefetch_plan): the distance, 0 where they prefetched none;
        None where the step was not wholly fused."""
        if self._step_kernels_used() != "fused":
            return None
        return self.generator.model.prefetch_distance

    def _attention_launch_used(self, used: dict) -> dict[str, Any]:
        """How the split-KV decode attention's kernels launched under PDL (kernels/
        decode_attention.py): attention_pdl "both" (the default), "combine" or "none";
        split_stages, its split kernel's num_stages under PDL (0: Triton's own); early_block,
        whether a one-block split program loaded its block before the wait, in the step
        step_kernels names (the fused step's where a batch of 1 fused its attention), and
        early_block_way, the EARLY_BLOCK that chose it ("auto", the default, or an A/B's "on"
        or "off"); None where the compiled step ran no such kernel under PDL (eager, PDL off,
        another attention)."""
        if not (self.config.compile and self.generator.pdl and "triton" in used):
            return {"attention_pdl": None, "split_stages": None, "early_block": None,
                    "early_block_way": None}
        # only here: the kernels' module defines triton ops, which an eager run never imports
        from infermeter.engine.kernels import decode_attention

        way = decode_attention.ATTENTION_PDL
        launched = way != "none"
        early = decode_attention.early_block_for(self._attention_fused())
        return {"attention_pdl": way,
                "split_stages": decode_attention.SPLIT_STAGES if launched else None,
                "early_block": early if launched else None,
                "early_block_way": decode_attention.EARLY_BLOCK if launched else None}

    def _attention_fused(self) -> bool:
        """Whether the compiled batch-1 step ran some layer's attention among the fused step's
        kernels (its norm + wqkv or its wo + add fused: what Attention.forward passes as
        fused_step)."""
        if self._step_kernels_used() in (None, "split"):
            return False
        return any(layer.step_kernels == "fused"
                   and {"attention_in", "attention_out"} & set(layer.fused_parts())
                   for layer in self.generator.model.layers)

    def _unsplit_used(self, used: dict) -> bool | None:
        """Whether the compiled step's split-KV decode attention ran unsplit (kernels/
        decode_attention.py, UNSPLIT: an A/B's setting): on, and some layer's cache (the case's
        length, a windowed layer's at most its window) fits one program; None where the
        compiled step ran no such kernel."""
        if not (self.config.compile and "triton" in used):
            return None
        from infermeter.engine.kernels import decode_attention  # only here, as above

        spec = self.generator.model.spec
        slots = self.generator.max_seq_len or spec.max_seq_len
        layer_slots = {min(slots, spec.layer_window(i) or slots) for i in range(spec.n_layers)}
        return decode_attention.UNSPLIT == "on" and any(
            decode_attention.unsplit_fits(n, spec.head_dim) for n in layer_slots)

    def _compile_tuning_used(self) -> str | None:
        """Whether inductor tuned the compiled decode step's own kernels by timing them
        (generator.COMPILE_TUNING: "on", the default, or an A/B's "off"); None where no step
        was compiled by inductor (eager, the cudagraphs backend)."""
        if not (self.config.compile and self.generator.compile_backend == "inductor"):
            return None
        return generator_module.COMPILE_TUNING

    def _silu_block_used(self) -> int | None:
        """The columns a program of the SwiGLU activation kernel handled (kernels/swiglu.py,
        BLOCK: an A/B's setting), where a compiled run could launch it: some SwiGLU layer
        takes the Triton activation and Triton runs on the weights' device; else None (eager,
        GeGLU, "inline" or "aten", no Triton there)."""
        model = self.generator.model
        if not (self.config.compile and triton_runs_on(model.tok_embeddings.weight)
                and any(isinstance(ffn, FeedForward) and not ffn.gelu
                        and ffn.activation_kernel == "triton"
                        for ffn in (layer.feed_forward for layer in model.layers))):
            return None
        from infermeter.engine.kernels import swiglu  # only here, as decode_attention

        return swiglu.BLOCK

    def _fused_head_used(self) -> bool | None:
        """Whether the fused step ran its final norm and output head as one kernel
        (model.FUSED_HEAD, Transformer.head_fuses); None where no layer ran fused."""
        if self._step_kernels_used() in (None, "split"):
            return None
        return self.generator.model.head_fuses()

    def _releases_movable(self) -> bool:
        """Some layer ran fused, with PDL: the fused kernels had a release to move (the three
        release fields below are None otherwise)."""
        return self._step_kernels_used() not in (None, "split") and self.generator.pdl

    def _early_release_used(self) -> bool | None:
        """Whether the fused step's wo, w13 and w2 kernels and its attention's combine released
        the next kernel before their PDL wait (pdl.EARLY_RELEASE "on", the default; "off" an
        A/B's); None where no layer ran fused or the step ran without PDL (no release to
        move)."""
        if not self._releases_movable():
            return None
        from infermeter.engine.kernels import pdl  # only here, as decode_attention

        return pdl.early_release()

    def _attention_release_used(self) -> str | None:
        """Where the fused step's norm + wqkv and split kernels released the next kernel:
        "after" their PDL wait or "before" it (pdl.ATTENTION_RELEASE: "auto", the default, by
        the step's weight bytes; either by name an A/B's); None where no layer ran fused or the
        step ran without PDL (no release to move)."""
        if not self._releases_movable():
            return None
        return attention_release_way(step_weight_bytes(self.generator.model))

    def _attention_release_asked(self) -> str | None:
        """pdl.ATTENTION_RELEASE as asked ("auto", the default, or a way by name, an A/B's),
        where _attention_release_used says a way."""
        if not self._releases_movable():
            return None
        from infermeter.engine.kernels import pdl  # only here, as decode_attention

        return pdl.ATTENTION_RELEASE

    def _fused_tiles_used(self) -> dict[str, Any]:
        """Where the fused kernels took their tiles from (fused_step.TILES_FROM: "table", the
        default; "gemv" or "file", an A/B's settings) and the entry they took on this GPU
        (kernel -> column count -> [BLOCK_N, BLOCK_K, num_warps]; {}: the GEMV's tiles,
        adapted); both None where no layer ran fused."""
        if self._step_kernels_used() in (None, "split"):
            return {"fused_tiles_from": None, "fused_tiles": None}
        from infermeter.engine.kernels import fused_step  # only here, as decode_attention
        from infermeter.engine.kernels.gemv import gpu_name

        entry = fused_step.tile_entry(gpu_name(self.generator.model.output.weight.device))
        return {"fused_tiles_from": fused_step.TILES_FROM,
                "fused_tiles": {kernel: {str(cols): list(tiles) for cols, tiles in widths.items()}
                                for kernel, widths in entry.items()}}

    def _qk_norm_kernels_used(self) -> int | None:
        """How the fused layers with per-head q/k norms ran them where the wqkv kernel ropes
        (fused_rope): 2 in a kernel of their own after norm + wqkv (Attention.qk_norms_apart,
        qk_norm_rope.QK_NORM_KERNELS), 1 in wqkv's kernel, a program a head; None where no such
        layer runs the fused kernels ("fused" or "partly fused" steps only)."""
        if self._step_kernels_used() not in ("fused", "partly fused") \
                or not self._fused_rope_used():
            return None
        layers = [layer.attention for layer in self.generator.model.layers
                  if layer.step_kernels == "fused" and "attention_in" in layer.fused_parts()
                  and layer.attention.q_norm is not None]
        if not layers:
            return None
        return 2 if all(attention.qk_norms_apart() for attention in layers) else 1

    def _moe_kernel_used(self) -> str | None:
        """The decode steps' experts: "triton" where the blocks take the Triton kernels at the
        case's batch (moe.takes_expert_kernel, the block's own rule: expert_gemv.py's gathered
        ones while batch x k <= E, expert_gemm.py's grouped ones past that; "auto" takes them
        at batch 1 and past E / k; eager and compiled alike), else "torch"; batches that differ
        give "triton/torch"; None for a model without MoE layers."""
        blocks = self._moe_blocks()
        if not blocks:
            return None
        # after warmup() learned the batches (none yet: nothing ran)
        used = dict.fromkeys("triton" if all(takes_expert_kernel(block, batch)
                                             for block in blocks) else "torch"
                             for batch in self.batch_sizes)
        return "/".join(used) or "torch"

    def _moe_fused_step_used(self) -> bool | None:
        """Whether every MoE block of the traced batch-1 steps ran as the fused step's four
        kernels (MoEFeedForward.fused_step: --step-kernels fused with the Triton experts);
        None for a model without MoE layers and in eager mode."""
        blocks = self._moe_blocks()
        if not blocks or not self.config.compile:
            return None
        return all(block.took_fused_step for block in blocks)

    def _moe_blocks(self) -> list[MoEFeedForward]:
        return [m for m in self.generator.model.modules() if isinstance(m, MoEFeedForward)]

    def warmup(self, shapes: set[tuple[int, int]]) -> None:
        """Compile and capture (compiled) or a short run (eager) for every (batch, length)."""
        self.batch_sizes = sorted({batch for batch, _ in shapes})
        self.prompt_lens = sorted({length for _, length in shapes})
        for batch, length in sorted(shapes):
            with nvtx_range(f"warmup {batch}x{length}"):
                self.generator.warmup(batch, length, self.config)

    def run(self, tokens: Tensor, hook: Callable[[str, int], None]) -> GenerationOutput:
        if not cuda_ready():  # NVTX ranges are for nsys on a GPU; the CPU path stays bare
            return self.generator.generate(tokens, self.config, hook=hook)
        ranges = StepRanges(hook, self.config.max_new_tokens)
        try:
            return self.generator.generate(tokens, self.config, hook=ranges)
        finally:
            ranges.close()


class StepRanges:
    """A generate() hook around another: NVTX ranges "prefill", "decode 1", "decode 2", ...
    The engine calls the hook after each phase, so a phase's range opens at the previous call."""

    def __init__(self, hook: Callable[[str, int], None], max_new_tokens: int) -> None:
        self.hook, self.last_step, self.open = hook, max_new_tokens - 1, False

    def __call__(self, event: str, step: int) -> None:
        self.hook(event, step)  # the timing mark first: the range calls stay outside it
        self.close()
        if event == "start":
            self._push("prefill")
        elif step < self.last_step:  # after the last decode step no step follows
            self._push(f"decode {step + 1}")

    def _push(self, name: str) -> None:
        range_push(name)
        self.open = True

    def close(self) -> None:
        if self.open:
            range_pop()
            self.open = False


def make_runner(model: Transformer, case: Case, request: GenerateRequest) -> Any:
    if case.mode != "eager":
        # dynamo keeps compiled variants per code object and, past its recompile limit (8),
        # silently runs eager: a sweep of shapes must start each compiled case afresh (hf too:
        # transformers compiles Module.__call__, one code object for every model).
        torch._dynamo.reset()
    if case.mode in ("compiled", "eager"):
        return EngineRunner(model, case, request)
    from infermeter.generate.hf import HFRunner

    return HFRunner(model, request.sampling, compile=case.mode == "hf")
