"""The hf mode: transformers' `generate` with its static cache, on the engine's own weights.

The HF model is built on the meta device from the config our HF writer produces
(engine/hf_checkpoint.hf_config) and filled with the engine's tensors (load_state_dict with
assign=True): every tensor is shared except wq and wk, whose rows HF orders for rotate_half RoPE
(hf_checkpoint.permute), so the two models hold the same weights without a second copy. MoE
layers: transformers 5 holds each layer's experts as gate_up_proj [E, 2 ffn, dim] (gate rows,
then up rows) and down_proj [E, dim, ffn]: down_proj is the engine's stacked w2, gate_up_proj a
concatenated copy of w1 and w3 (counted by the fit check); where a transformers holds one module
an expert, each gets views of the engine's stacked tensors.
The rotary tables are buffers the state dict does not carry; they are rebuilt on the device.

Timing: a logits processor calls the same hook the Generator calls. transformers runs logits
processors once per new token, after that token's forward and before its argmax, so
  TTFT = generate() entry -> first processor call: input preparation, static-cache allocation on
         the first call of a shape (the warm-up makes that call), the prefill forward;
  TPOT = one processor call to the next: the previous token's argmax and bookkeeping (and the
         per-step stopping check, which syncs with the GPU in older versions) + one forward.
Greedy runs are fixed length: min_new_tokens = max_new_tokens and no EOS id, unless --until-eos.
Sampling uses torch's global RNG seeded per run: its tokens differ from the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.checkpoint.hf import (
    expert_hf_name,
    hf_config,
    meta_to_hf_name,
    permute,
    rope_heads,
)
from infermeter.engine.dtypes import dtype_name
from infermeter.engine.fusion import meta_state_dict
from infermeter.engine.generator import GenerationConfig, GenerationOutput
from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _hf_state(model: Transformer, hf_keys: set[str]) -> dict[str, Tensor]:
    """The engine's tensors under the names (and in the layouts) of the HF model whose state
    dict has `hf_keys`."""
    spec, state = model.spec, {}
    experts: dict[str, dict[str, Tensor]] = {}  # layer prefix -> {"w1": [E, ffn, dim], ...}
    for name, tensor in meta_state_dict(model).items():
        if tensor.dim() == 3 and ".feed_forward.w" in name:  # an MoE layer's stacked experts
            layer, part = name.removesuffix(".weight").rsplit(".feed_forward.", 1)
            experts.setdefault(layer, {})[part] = tensor
            continue
        key = meta_to_hf_name(name, spec)
        if name.endswith(".feed_forward.gate.weight") and key not in hf_keys:
            key = key.replace(".block_sparse_moe.", ".mlp.")  # transformers 5's Mixtral router
        heads = rope_heads(name, spec)
        state[key] = tensor if heads is None else permute(tensor, heads)
    for layer, parts in experts.items():
        fused = f"model.{layer}.mlp.experts.gate_up_proj"
        if fused in hf_keys:
            state[fused] = torch.cat([parts["w1"], parts["w3"]], dim=1)
            state[f"model.{layer}.mlp.experts.down_proj"] = parts["w2"]
            continue
        for part, stacked in parts.items():  # one module an expert (transformers 4)
            for expert, weight in enumerate(stacked):
                state[expert_hf_name(f"{layer}.feed_forward.{part}.weight", expert, spec)] = \
                    weight
    return state


def build_hf_model(model: Transformer) -> Any:
    """An HF CausalLM (eval, sdpa attention; eager for Gemma 2, whose soft-capped attention
    transformers refuses to run through SDPA) sharing `model`'s weights and device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec, weight = model.spec, model.tok_embeddings.weight
    cfg = hf_config(spec, dtype_name(weight.dtype))
    arch = cfg.pop("model_type")
    for key in ("architectures", "torch_dtype"):
        cfg.pop(key)
    if len(spec.sliding_window_layers) == spec.n_layers:
        # Every layer windowed (Mistral): sliding_window says it all, and transformers' Mistral
        # model fails on a per-layer `layer_types` list (5.x: "use Ministral").
        cfg.pop("layer_types", None)
    config = AutoConfig.for_model(arch, **cfg, bos_token_id=None, eos_token_id=None,
                                  pad_token_id=None)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager" if arch == "gemma2" else "sdpa")
    hf.load_state_dict(_hf_state(model, set(hf.state_dict())), strict=True, assign=True)
    if spec.tie_embeddings:
        hf.tie_weights()
    _rebuild_meta_buffers(hf, weight.device)
    return hf.eval().requires_grad_(False)


def _rebuild_meta_buffers(hf: Any, device: torch.device) -> None:
    """Rotary modules keep their tables in non-persistent buffers: build them again on device."""
    for name, module in list(hf.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(
                b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                fresh = type(module)(config=hf.config)
            setattr(hf.get_submodule(parent_name) if parent_name else hf, attr, fresh)
        scale = getattr(module, "embed_scale", None)  # Gemma's embedding: sqrt(dim), a buffer
        if isinstance(scale, Tensor) and scale.is_meta and hasattr(module, "scalar_embed_scale"):
            module.register_buffer("embed_scale", torch.tensor(module.scalar_embed_scale,
                                                               device=device), persistent=False)
    left = [name for name, b in hf.named_buffers() if b.is_meta]
    if left:
        raise InfermeterError(f"hf mode: could not build buffers {left[:3]} of the HF model "
                              f"(transformers {transformers_version()})")


def _processor(hook: Callable[[str, int], None]) -> Any:
    from transformers import LogitsProcessor

    class HookProcessor(LogitsProcessor):
        """Calls hook("prefill", 0) for the first token, ("decode", i) for the next ones."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            self.calls += 1
            hook("prefill" if self.calls == 1 else "decode", self.calls - 1)
            return scores

    return HookProcessor()


class HFRunner:
    """Same interface as generation_modes.EngineRunner: warmup(shapes), run(tokens, hook)."""

    def __init__(self, model: Transformer, config: GenerationConfig, compile: bool) -> None:
        if transformers_version() is None:
            raise InfermeterError("the hf mode needs transformers (pip install transformers)")
        from transformers import GenerationConfig as HFGenerationConfig

        self.hf = build_hf_model(model)
        self.config = config
        stops = sorted(config.stop_ids)
        fixed = not stops
        self.gen_config = HFGenerationConfig(
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.max_new_tokens if fixed else None,
            do_sample=not config.greedy, temperature=config.temperature if not config.greedy
            else None, top_p=config.top_p if not config.greedy else None, top_k=None,
            eos_token_id=stops or None, pad_token_id=stops[0] if stops else None,
            bos_token_id=None, cache_implementation="static", disable_compile=not compile)

    def describe(self) -> dict[str, Any]:
        compiled = getattr(self.hf, "_compiled_call", None) is not None
        return {"transformers": transformers_version(), "hf_compiled": compiled,
                "hf_cache": "static, prompt + new tokens long",
                "hf_timing": "a logits processor marks each token after its forward, before "
                             "its argmax"}

    def warmup(self, shapes: set[tuple[int, int]]) -> None:
        """One untimed generate per shape: allocates HF's static cache and compiles (if it does)."""
        device = self.hf.device
        for batch, length in sorted(shapes):
            self.run(torch.zeros(batch, length, dtype=torch.int64, device=device),
                     lambda event, step: None)

    @torch.no_grad()
    def run(self, tokens: Tensor, hook: Callable[[str, int], None]) -> GenerationOutput:
        from transformers import LogitsProcessorList

        processor = _processor(hook)
        if not self.config.greedy:
            torch.manual_seed(self.config.seed)
        hook("start", 0)
        out = self.hf.generate(tokens, attention_mask=torch.ones_like(tokens),
                               generation_config=self.gen_config,
                               logits_processor=LogitsProcessorList([processor]))
        rows = out[:, tokens.shape[1]:].tolist()  # [B, new] to the host
        ids, finished = [], []
        for row in rows:
            cut = next((i for i, t in enumerate(row) if t in self.config.stop_ids), None)
            ids.append(row if cut is None else row[:cut])
            finished.append(cut is not None)
        return GenerationOutput(ids, finished, tokens.shape[1], processor.calls - 1)
