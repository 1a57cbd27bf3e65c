"""Rotary position embeddings in Meta's layout.

Meta's llama/model.py rotates *adjacent* pairs of each head's features: (x0, x1), (x2, x3), ...
(it views the last dimension as head_dim/2 complex numbers). Hugging Face's Llama instead rotates
(x_i, x_{i+head_dim/2}) ("rotate_half"); its conversion script permutes the rows of wq/wk so the
two are equivalent. The engine keeps Meta's layout; `hf_checkpoint.py` undoes HF's permutation.

The complex product is written with real cos/sin tables (float32 buffers) so the kernel is plain
elementwise math: fine for torch.compile, CUDA graphs, and fp16/bf16 activations.

Frequencies follow the reference implementations:
  plain:  inv_freq_i = 1 / theta^(2i / head_dim)
  linear: inv_freq / factor (the same as dividing positions by factor)
  llama3: Llama 3.1's `apply_scaling`: long wavelengths divided by factor, short ones kept,
          a smooth blend in between (wavelength bounds from original_max_position).
  yarn:   YaRN (gpt-oss, Qwen and DeepSeek configs), as transformers' _compute_yarn_parameters:
          frequencies that turn fewer than beta_slow times over original_max_position divided by
          factor, more than beta_fast times kept, a linear ramp between; cos and sin are then
          multiplied by its attention factor (0.1 ln(factor) + 1, or the config's), which scales
          every q.k score by its square.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infermeter.errors import InfermeterError
from infermeter.specs.model import ModelSpec, RopeScaling


def _llama3_scaling(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Meta's llama3.1 apply_scaling, vectorised (same formula as transformers' llama3 rope)."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_scaling(spec: ModelSpec, device: torch.device | str | None) -> Tensor:
    """transformers' _compute_yarn_parameters' inverse frequencies (its formula and order of
    operations, so the float32 values are the same)."""
    scaling, dim, base = spec.rope_scaling, spec.head_dim, spec.rope_theta
    assert scaling is not None
    extra = dict(scaling.extra)
    beta_fast, beta_slow = extra.get("beta_fast") or 32, extra.get("beta_slow") or 1
    old_len = scaling.original_max_position

    def correction_dim(rotations: float) -> float:  # the feature index that turns `rotations`
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if extra.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(device=device)  # 1: the frequency kept, 0: divided by factor
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - extrapolation) \
        + (1.0 / pos_freqs) * extrapolation


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(spec: ModelSpec) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor (the config's
    attention_factor, else from factor and mscale / mscale_all_dim); 1.0 for other RoPE."""
    scaling = spec.rope_scaling
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    extra = dict(scaling.extra)
    if extra.get("attention_factor") is not None:
        return float(extra["attention_factor"])
    mscale, mscale_all_dim = extra.get("mscale"), extra.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(scaling.factor, mscale)
                     / _yarn_mscale(scaling.factor, mscale_all_dim))
    return _yarn_mscale(scaling.factor)


def check_rope(spec: ModelSpec) -> None:
    """Fail at model construction, not at the first forward, for RoPE the engine cannot do."""
    if spec.head_dim % 2:
        raise InfermeterError(f"model {spec.name}: RoPE needs an even head_dim, "
                              f"got {spec.head_dim}")
    kind = spec.rope_scaling.kind if spec.rope_scaling is not None else None
    if kind not in (None, "linear", "llama3", "yarn"):
        raise InfermeterError(f"model {spec.name}: RoPE scaling {kind!r} is not supported "
                              "by the engine (it runs plain, 'linear', 'llama3' and 'yarn')")


def inv_frequencies(spec: ModelSpec, device: torch.device | str | None = None) -> Tensor:
    """[head_dim / 2] float32 rotation speeds, after the spec's scaling."""
    check_rope(spec)
    exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (spec.rope_theta ** (exponents / spec.head_dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "yarn":
        return _yarn_scaling(spec, device)
    return _llama3_scaling(inv_freq, scaling)


def rope_tables(spec: ModelSpec, max_seq_len: int,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin, each [max_seq_len, head_dim / 2] float32, for positions 0..max_seq_len-1,
    times the RoPE's attention factor (YaRN's; else 1)."""
    inv_freq = inv_frequencies(spec, device)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    scale = attention_factor(spec)
    if scale == 1.0:
        return torch.cos(angles), torch.sin(angles)
    return torch.cos(angles) * scale, torch.sin(angles) * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of x by the angles of each position.

    x: [B, T, H, head_dim]; cos, sin: [T, head_dim / 2] (already gathered at the positions).
    Computed in float32 and cast back, as Meta's apply_rotary_emb does.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, head_dim/2, 2]
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]  # [1, T, 1, head_dim/2]
    sin = sin[None, :, None, :]
    # (a + ib)(cos + i sin) = (a cos - b sin) + i (a sin + b cos)
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).type_as(x)
