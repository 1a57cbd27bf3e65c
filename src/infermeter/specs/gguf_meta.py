"""GGUF files (llama.cpp, ollama, LM Studio): the model's shape and file facts from the metadata.

A GGUF file is one binary: a key/value header (llama.cpp's names: `llama.block_count`,
`tokenizer.ggml.tokens`, ...), tensor descriptions, then the tensors, mostly quantized in blocks.
It is read with the `gguf` package (llama.cpp's own reader, GGUFReader), which memory-maps the file:
reading the shape touches the header only. `gguf` is imported on first use, so the rest of the CLI
runs without it.

Architectures (general.architecture -> the engine's): "llama" (Llama, Mistral; Mixtral when
expert_count > 0), "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3" (the text model), "gpt-oss".
Anything else is one error line naming the architecture. What llama.cpp does not write it fixes
in code, and so does this reader: Gemma 2 slides on layers 0, 2, 4, ... (4096 tokens unless said),
Gemma 3 on five layers of six with a local RoPE base of 10,000 (attention.sliding_window_pattern
and rope.freq_base_swa win where a file has them), Gemma's query scale is head_dim ** -0.5 but
(dim / heads) ** -0.5 for the 27B models (46 and 62 layers), MoE routing renormalises the
top k (expert_weights_norm, where written, says otherwise), and gpt-oss slides on layers 0, 2,
4, ..., its experts' SwiGLU is clamped (alpha 1.702, limit 7) and its YaRN has betas 32 and 1,
not truncated (its biases and sinks are seen from the tensors the file holds).
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.specs.checked import checked_int, checked_layer_count, checked_number
from infermeter.specs.model import ModelSpec, RopeScaling

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"
# general.architecture -> ModelSpec.arch ("llama" with experts is Mixtral: see _arch)
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
         "gemma2": "gemma2", "gemma3": "gemma3_text", "gpt-oss": "gpt_oss"}
# ModelSpec.arch -> the file's general.architecture (the writer's side of ARCHS)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "gpt_oss": "gpt-oss"}
# llama.cpp's fixed Gemma facts: every n-th layer global (set_swa_pattern), Gemma 2's window
# when the file does not say it, Gemma 3's local RoPE base, the 27B models' layer counts.
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA2_WINDOW = 4096
_GEMMA3_LOCAL_THETA = 10000.0
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's fixed gpt-oss facts (its graph, not the file): every other layer slides from layer
# 0 (set_swa_pattern(2)), the experts' SwiGLU alpha and clamp (swiglu_oai's 1.702 and 7), and
# YaRN as gpt-oss's config.json has it: betas 32 and 1 (the yarn_beta_* keys win where written)
# and the correction range not truncated to whole dimensions.
_GPT_OSS_PATTERN = 2
_GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
_GPT_OSS_YARN = (("beta_fast", 32.0), ("beta_slow", 1.0), ("truncate", False))
# Tensors a GGUF may carry that are not weights of the model: llama.cpp's precomputed Llama 3.1
# RoPE divisors (read into the spec's rope_scaling below).
ROPE_FREQS = "rope_freqs.weight"
# The keys llama.cpp reads per layer (get_key_or_arr): a file may hold one value a layer.
_PER_LAYER_KEYS = (".attention.head_count", ".attention.head_count_kv", ".feed_forward_length")


def import_gguf() -> Any:
    """The `gguf` module, or one clear error line when it is not installed."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise InfermeterError("reading GGUF files needs the gguf package: pip install gguf "
                              "(or pip install 'infermeter[gguf]')") from None


def is_gguf(path: Path) -> bool:
    """A file named *.gguf, or any file that starts with GGUF's magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    gguf = import_gguf()
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise InfermeterError(f"{path}: not a GGUF file (starts with {head!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except ValueError as err:
        if "GGMLQuantizationType" in str(err):  # the enum lookup of a tensor's type id
            raise InfermeterError(
                f"{path}: a tensor has a quant type unknown to gguf {_version(gguf)} "
                f"({err}); a newer gguf may read it (pip install -U gguf)") from None
        raise InfermeterError(f"{path}: truncated or damaged GGUF file ({err})") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        raise InfermeterError(f"{path}: truncated or damaged GGUF file ({err})") from None


def _version(gguf: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # imported from a plain folder on PYTHONPATH
        return "(unknown version)"


def open_gguf(path: Path | str) -> Any:
    """A GGUFReader for `path` (cached per path, modification time and size); errors are clear
    lines: no such file, wrong magic, truncated, unknown quant type."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InfermeterError(f"{path}: no such file") from None
    except OSError as err:
        raise InfermeterError(f"{path}: cannot read ({err.strerror})") from None
    if not path.is_file():
        raise InfermeterError(f"{path}: not a file")
    reader = _reader(str(path), stat.st_mtime_ns, stat.st_size)
    ends = [t.data_offset + t.n_bytes for t in reader.tensors]
    if ends and max(ends) > stat.st_size:
        raise InfermeterError(f"{path}: truncated GGUF file ({stat.st_size:,} bytes, its "
                              f"tensors end at byte {max(ends):,})")
    return reader


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as Python (str, int, float, bool or list), or `default` if absent."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def _need(reader: Any, key: str, path: Path, default: Any = None) -> Any:
    """The key's value, else `default`; neither is one error line."""
    value = field(reader, key, default)
    if value is None:
        raise InfermeterError(f"{path}: GGUF metadata has no {key!r}")
    return value


def _key_name(path: Path, key: str) -> str:
    """How an error line names a metadata key: "<file>: GGUF key llama.block_count"."""
    return f"{path}: GGUF key {key}"


def _whole(value: Any) -> Any:
    """A count a writer stored as a float (4.0) is the integer it holds; 4.5 is not one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(reader: Any, key: str, path: Path, default: int | None = None,
         minimum: int = 1) -> int:
    """An integer key, at least `minimum` (1: a positive count or size), checked as config.json's
    fields are: a string, a bool, 4.5 or an array (but a per-layer key's) is one error line."""
    value = _need(reader, key, path, default)
    if isinstance(value, list) and value and key.endswith(_PER_LAYER_KEYS):
        # one value for all layers first: a hybrid model's 0 on its layers without attention
        # is told as what the engine lacks, not as a bad count
        numbers = {c if isinstance(c, (int, float)) and not isinstance(c, bool) else repr(c)
                   for c in value}  # 4 and 4.0 are one value; any other entry as written
        if len(numbers) != 1:
            raise InfermeterError(f"{path}: {key} differs between layers ({value[:8]}...); "
                                  "the engine needs one value for every layer")
        value = value[0]
    return checked_int(_whole(value), _key_name(path, key), minimum)


def _number(reader: Any, key: str, path: Path, default: float | None = None) -> float:
    """A positive, finite float key (norm epsilons, RoPE bases and factors), checked as
    config.json's fields are, then as written (_float)."""
    value = _need(reader, key, path, default)
    return _float(checked_number(value, _key_name(path, key)))


def _float(value: float) -> float:
    """GGUF stores float32: 1e-5 comes back as 9.99999974e-06; keep the decimal it was written
    as (the shortest that rounds to the same float32). A float64 key beyond float32's range is
    kept as it is, not made 0 or inf."""
    import numpy as np

    single = np.finfo(np.float32)
    if not single.tiny <= value <= single.max:
        return float(value)
    return float(str(np.float32(value)))


def architecture(reader: Any, path: Path) -> str:
    arch = _need(reader, "general.architecture", path)
    if arch not in ARCHS:
        raise InfermeterError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHS)}; Mistral files say 'llama')")
    return str(arch)


def tensor_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in PyTorch's order (GGUF lists the fastest dimension first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def _llama3_divisors(theta: float, head_dim: int, scaling: RopeScaling) -> list[float]:
    """What llama.cpp's converter stores in rope_freqs for Llama 3.1 scaling: for each frequency,
    original inv_freq / scaled inv_freq (engine/rope.py's formula, in plain Python)."""
    import math

    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old = scaling.original_max_position
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _rope_scaling(reader: Any, arch: str, path: Path, theta: float,
                  head_dim: int) -> RopeScaling | None:
    """rope.scaling.* keys (linear, yarn), or Llama 3.1's divisors in the rope_freqs tensor."""
    kind = field(reader, f"{arch}.rope.scaling.type")
    factor = field(reader, f"{arch}.rope.scaling.factor")
    original = f"{arch}.rope.scaling.original_context_length"
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        import numpy as np

        gguf = import_gguf()
        divisors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        guess = RopeScaling("llama3", float(divisors.max()), 1.0, 4.0,
                            _int(reader, original, path, default=8192))
        if len(divisors) != head_dim // 2 or not np.allclose(
                divisors, _llama3_divisors(theta, head_dim, guess), rtol=1e-4):
            raise InfermeterError(f"{path}: {ROPE_FREQS} holds RoPE factors other than Llama "
                                  "3.1's (factor, 1, 4, 8192); the engine cannot run them")
        return guess
    if kind in (None, "none") or factor is None or factor == 0:  # llama.cpp: 0 scales nothing
        return None
    extra: tuple[tuple[str, Any], ...] = ()
    if arch == "gpt-oss" and kind == "yarn":
        extra = tuple((key, _number(reader, f"{arch}.rope.scaling.yarn_{key}", path, value)
                       if key.startswith("beta") else value) for key, value in _GPT_OSS_YARN)
    context = _int(reader, f"{arch}.context_length", path, default=4096)
    return RopeScaling(str(kind), _number(reader, f"{arch}.rope.scaling.factor", path),
                       original_max_position=_int(reader, original, path, default=context),
                       extra=extra)


def spec_from_gguf(path: Path | str) -> ModelSpec:
    """The model's shape from a GGUF file's metadata and tensor shapes (no tensor data read).

    torch_dtype is bfloat16: a GGUF's quantized weights run dequantized, in bf16 unless
    --dtype says otherwise (gguf_facts gives the bytes as stored).
    """
    path = Path(path).expanduser()
    reader = open_gguf(path)
    arch = architecture(reader, path)
    shapes = tensor_shapes(reader)
    embedding = shapes.get("token_embd.weight")
    if embedding is None:
        raise InfermeterError(f"{path}: missing tensor token_embd.weight")
    # every count is checked before any arithmetic uses it (dim // n_heads just below)
    dim, n_heads = _int(reader, f"{arch}.embedding_length", path), _int(
        reader, f"{arch}.attention.head_count", path)
    head_dim_key = f"{arch}.attention.key_length"
    if field(reader, head_dim_key) is None and dim % n_heads:
        raise InfermeterError(f"{path}: {arch}.embedding_length {dim} is not a multiple of "
                              f"{arch}.attention.head_count {n_heads} and there is no "
                              f"{head_dim_key}: the head size is unknown")
    head_dim = _int(reader, head_dim_key, path, default=dim // n_heads)
    rotary = _int(reader, f"{arch}.rope.dimension_count", path, default=head_dim)
    if rotary != head_dim:
        raise InfermeterError(f"{path}: RoPE on {rotary} of {head_dim} head features; the "
                              "engine rotates whole heads")
    theta = _number(reader, f"{arch}.rope.freq_base", path, 10000.0)
    n_layers = _layer_count(reader, f"{arch}.block_count", path)
    gemma = arch in _GEMMA_PATTERN
    fields = dict(
        name=path.stem, arch=_arch(reader, arch, path),
        n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=_int(reader, f"{arch}.attention.head_count_kv", path, default=n_heads),
        head_dim=head_dim, ffn_dim=_int(reader, f"{arch}.feed_forward_length", path),
        vocab_size=embedding[0],
        norm_eps=_number(reader, f"{arch}.attention.layer_norm_rms_epsilon", path,
                         1e-6 if gemma else 1e-5),
        rope_theta=theta, rope_scaling=_rope_scaling(reader, arch, path, theta, head_dim),
        max_seq_len=_int(reader, f"{arch}.context_length", path, default=4096),
        tie_embeddings="output.weight" not in shapes,
        qkv_bias="blk.0.attn_q.bias" in shapes, o_bias="blk.0.attn_output.bias" in shapes,
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),  # per-head q/k norms, as HF's types
        torch_dtype="bfloat16", source=str(path),
        **(_gemma(reader, arch, path, n_layers, dim, n_heads, head_dim) if gemma else {}),
        **(_gpt_oss(reader, arch, path, n_layers, shapes) if arch == "gpt-oss" else {}),
        **_experts(reader, arch, path, shapes))
    try:
        return ModelSpec(**fields)
    except InfermeterError as err:
        raise InfermeterError(f"{path}: {err}") from None


def _layer_count(reader: Any, key: str, path: Path) -> int:
    """block_count: a positive integer, at most checked.MAX_LAYERS (sizing walks every layer)."""
    return checked_layer_count(_int(reader, key, path), _key_name(path, key))


def _arch(reader: Any, arch: str, path: Path) -> str:
    if arch == "llama" and _int(reader, "llama.expert_count", path, default=0, minimum=0):
        return "mixtral"
    return ARCHS[arch]


def _gemma(reader: Any, arch: str, path: Path, n_layers: int, dim: int, n_heads: int,
           head_dim: int) -> dict[str, Any]:
    """Gemma 2 / 3: window layers, soft caps, the query scale, the local RoPE base."""
    if arch == "gemma2":
        window = _int(reader, f"{arch}.attention.sliding_window", path, default=_GEMMA2_WINDOW)
    else:
        window = _int(reader, f"{arch}.attention.sliding_window", path)
    layers = _window_layers(reader, arch, path, n_layers, _GEMMA_PATTERN[arch])

    def cap(key: str) -> float | None:  # absent or 0: no cap
        value = field(reader, f"{arch}.{key}")
        return None if value is None or value == 0 else _number(reader, f"{arch}.{key}", path)

    scalar = dim // n_heads if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim
    return {"sliding_window": window if layers else None, "sliding_window_layers": layers,
            "norms_per_layer": 4, "query_pre_attn_scalar": float(scalar),
            "attn_logit_softcap": cap("attn_logit_softcapping"),
            "final_logit_softcap": cap("final_logit_softcapping"),
            "rope_local_theta": None if arch == "gemma2" else
            _number(reader, f"{arch}.rope.freq_base_swa", path, _GEMMA3_LOCAL_THETA)}


def _window_layers(reader: Any, arch: str, path: Path, n_layers: int,
                   default: int) -> tuple[int, ...]:
    """The layers that slide: the file's sliding_window_pattern, else llama.cpp's fixed one."""
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern", default)
    if isinstance(pattern, list):  # one flag a layer: true where it slides
        if len(pattern) != n_layers:
            raise InfermeterError(f"{path}: {arch}.attention.sliding_window_pattern has "
                                  f"{len(pattern)} entries for {n_layers} layers")
        return tuple(i for i, slides in enumerate(pattern) if slides)
    # llama.cpp's set_swa_pattern(n): all but every n-th layer slide; n = 0: every layer does
    n = _int(reader, f"{arch}.attention.sliding_window_pattern", path, default, minimum=0)
    return tuple(i for i in range(n_layers) if n == 0 or i % n < n - 1)


def _gpt_oss(reader: Any, arch: str, path: Path, n_layers: int,
             shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """gpt-oss: its window layers, sinks, the experts' biases and clamped SwiGLU."""
    window = _int(reader, f"{arch}.attention.sliding_window", path)
    layers = _window_layers(reader, arch, path, n_layers, _GPT_OSS_PATTERN)
    return {"sliding_window": window if layers else None, "sliding_window_layers": layers,
            "attn_sinks": "blk.0.attn_sinks.weight" in shapes,
            "moe_bias": "blk.0.ffn_gate_exps.bias" in shapes, **_GPT_OSS_SWIGLU}


def _experts(reader: Any, arch: str, path: Path,
             shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Mixtral ("llama" with experts), Qwen3-MoE and gpt-oss: experts in every layer (as llama.cpp
    builds them), stacked [E, ...] per projection."""
    n_experts = _int(reader, f"{arch}.expert_count", path, default=0, minimum=0)
    if not n_experts:
        return {}
    if arch not in ("llama", "qwen3moe", "gpt-oss"):
        raise InfermeterError(f"{path}: experts in a GGUF {arch!r} model; the engine runs "
                              "experts of llama (Mixtral), qwen3moe and gpt-oss files")
    # stacked [E, ffn, dim], or llama.cpp's older one tensor per expert [ffn, dim]
    gate = next((s[-2:] for name, s in shapes.items()
                 if re.search(r"\.ffn_gate(_exps|\.\d+)\.weight$", name)), None)
    default = gate[0] if gate is not None else _int(reader, f"{arch}.feed_forward_length", path)
    norm = field(reader, f"{arch}.expert_weights_norm", True)
    return {"n_experts": n_experts,
            "n_active_experts": _int(reader, f"{arch}.expert_used_count", path),
            "moe_ffn_dim": _int(reader, f"{arch}.expert_feed_forward_length", path,
                                default=default),
            "norm_topk_prob": bool(norm)}


@dataclass(frozen=True)
class GGUFFacts:
    """What the file holds, beside the shape: its quant type and the tensors' bytes as stored."""

    quant_type: str  # e.g. "Q4_1", "Q4_K_M", "F16": general.file_type, else the most bytes' type
    weight_bytes: int  # every model tensor as stored in the file (quantized blocks)

    @property
    def weight_format(self) -> str:
        return f"gguf {self.quant_type}"


# gguf.LlamaFileType's names (llama.cpp's LLAMA_FTYPE_*) carry these before the quant's name.
_FILE_TYPE_PREFIXES = ("ALL_", "MOSTLY_")


def gguf_facts(path: Path | str) -> GGUFFacts:
    path = Path(path).expanduser()
    reader = open_gguf(path)
    gguf = import_gguf()
    model_tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]
    file_type = field(reader, "general.file_type")
    name = None
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(_int(reader, "general.file_type", path, minimum=0)).name
        except ValueError:  # a type this gguf does not know: guessed from the tensors below
            name = None
    if name is None or name == "GUESSED":
        by_type: dict[str, int] = {}
        for t in model_tensors:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
        name = max(by_type, key=by_type.__getitem__) if by_type else "unknown"
    for prefix in _FILE_TYPE_PREFIXES:
        name = name.removeprefix(prefix)
    return GGUFFacts(name, sum(int(t.n_bytes) for t in model_tensors))


def facts_for(spec: ModelSpec) -> GGUFFacts | None:
    """The GGUF facts of a spec read from a GGUF file (its source), else None."""
    source = Path(spec.source)
    return gguf_facts(source) if is_gguf(source) else None
