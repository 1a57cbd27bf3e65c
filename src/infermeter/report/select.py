"""Which Results make a report column, and which of their cases stand for it.

A column is one device x model x tensor-parallel degree. Several Results usually feed one column
(a copy sweep, generate runs at several batch sizes and contexts), so the reference table needs
one representative of each kind, chosen by fixed rules (written in the table caption):

- moving: the copy Result nearest the seed setting (batch 1, then the sequence length nearest
  512), and in it the pinned-host case of the engine layout (per-layer K and V tensors, what an
  engine really holds and what the seed moved) with the fastest method, per direction; if the
  Result has no engine layout, the contiguous layout, then paged. A column with no pinned case
  at all (a CPU run: pinned memory needs CUDA) takes its pageable case, then the seed's, and
  says which;
- tokens: a generate Result at batch 1, fixed length (not --until-eos), not one of `infermeter
  run`'s prefill-ladder Results (one new token each), compiled mode first, then eager, then
  anything else; of those the seed's shape: the cache nearest 512 tokens, then the number of new
  tokens nearest the seed's 432, then the context nearest 512 tokens.

Ties are broken by the Result's source (file and line), so the same files always give the same
table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from infermeter.engine.attention_choice import resolve_attention
from infermeter.report.load import Record
from infermeter.specs.expert_memory import uses_triton

SEED_CONTEXT = 512
SEED_NEW_TOKENS = 432
LAYOUT_ORDER = ("engine", "contiguous", "paged")
HOST_ORDER = ("pinned", "pageable", "seed")  # pinned first; the others where a run had none
MODE_ORDER = ("compiled", "eager")


def num(value: Any) -> float | None:
    """A finite number or None: booleans, strings, NaN and missing values are all 'not measured'."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def dig(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


@dataclass(frozen=True, order=True)
class ColumnKey:
    device: str
    model: str
    tp: int

    @property
    def label(self) -> str:
        device = f"{self.tp}× {self.device}" if self.tp > 1 else self.device
        return f"{device} · {self.model}" + (f" (tp {self.tp})" if self.tp > 1 else "")


@dataclass
class Column:
    key: ColumnKey
    copies: list[Record] = field(default_factory=list)
    generates: list[Record] = field(default_factory=list)
    kvs: list[Record] = field(default_factory=list)
    seed: dict[str, Any] | None = None  # the published seed numbers (see report_seed)


# The kinds a device column is made of; kv Results size a column, others have no table here.
COLUMN_KINDS = ("copy", "generate")


def column_key(record: Record) -> ColumnKey:
    device = record.env.get("device_name") or record.config.get("device") or "unknown device"
    tp = record.config.get("tp")
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 0 else 1
    return ColumnKey(str(device), str(record.model.get("name") or "unknown model"), tp)


def group_columns(records: list[Record]) -> tuple[list[Column], list[Record]]:
    """Columns (sorted by device, model, tp) and the kv Results, which belong to no device.

    kv Results are analytic (computed, not measured), so they name no GPU; they only fill the
    KV-cache size of a column of the same model and tp that has no copy Result.
    """
    columns: dict[ColumnKey, Column] = {}
    kvs = []
    # by source, so that the order the paths were given in changes nothing in the report
    for record in sorted(records, key=lambda r: r.source):
        if record.kind == "kv":
            kvs.append(record)
            continue
        if record.kind not in COLUMN_KINDS:  # no table of the report shows it (assemble notes it)
            continue
        key = column_key(record)
        column = columns.setdefault(key, Column(key))
        (column.copies if record.kind == "copy" else column.generates).append(record)
    for column in columns.values():
        column.kvs = [r for r in kvs if (column_key(r).model, column_key(r).tp)
                      == (column.key.model, column.key.tp)]
    return [columns[key] for key in sorted(columns)], kvs


def _context_distance(tokens: Any) -> float:
    value = num(tokens)
    return abs(math.log2(value / SEED_CONTEXT)) if value and value > 0 else math.inf


@dataclass(frozen=True)
class CopyPick:
    record: Record
    h2d: dict[str, Any] | None
    d2h: dict[str, Any] | None
    host: str = "pinned"  # the host memory of both cases (HOST_ORDER)

    @property
    def kv_bytes(self) -> float | None:
        return num(self.record.metrics.get("kv_cache_bytes"))

    @property
    def tokens(self) -> float | None:
        batch, seq = num(self.record.config.get("batch_size")), num(
            self.record.config.get("seq_len"))
        return batch * seq if batch and seq else None


def _cases(record: Record) -> list[dict[str, Any]]:
    cases = record.metrics.get("cases")
    return [c for c in cases if isinstance(c, dict)] if isinstance(cases, list) else []


def best_case(record: Record, direction: str, host: str = "pinned") -> dict[str, Any] | None:
    """The fastest `host` case of the first layout (engine, contiguous, paged) that has one."""
    for layout in LAYOUT_ORDER:
        cases = [c for c in _cases(record) if c.get("layout") == layout
                 and c.get("host_memory") == host and c.get("direction") == direction
                 and num(c.get("gbps")) and num(c.get("moving_time_ms"))]
        if cases:
            return max(cases, key=lambda c: (num(c["gbps"]), str(c.get("method"))))
    return None


def pick_copy(column: Column) -> CopyPick | None:
    def rank(record: Record) -> tuple:
        batch = num(record.config.get("batch_size"))
        return (batch != 1, _context_distance(record.config.get("seq_len")),
                -len(_cases(record)), record.source)

    for host in HOST_ORDER:
        usable = [r for r in column.copies
                  if best_case(r, "h2d", host) or best_case(r, "d2h", host)]
        if usable:
            record = min(usable, key=rank)
            return CopyPick(record, best_case(record, "h2d", host),
                            best_case(record, "d2h", host), host)
    return None


def has_timing(record: Record) -> bool:
    m = record.metrics
    return any(num(m.get(k)) is not None for k in (
        "generation_time_s", "token_generation_speed", "decode_tok_per_s", "ttft_ms")) or \
        tpot(record, "p50") is not None


def tpot(record: Record, which: str) -> float | None:
    """TPOT percentile in ms; an older Result that stored one number is read as its p50."""
    value = record.metrics.get("tpot_ms")
    if isinstance(value, dict):
        return num(value.get(which))
    return num(value) if which == "p50" else None


def context(record: Record) -> float | None:
    """The KV tokens a run decodes against: --context if it was a context set, else the mean
    context of its decode steps, else its prompt length (a copy: its seq_len)."""
    cfg, m = record.config, record.metrics
    for value in (cfg.get("context"), m.get("decode_context_mean"), cfg.get("prompt_len"),
                  cfg.get("seq_len")):
        if num(value):
            return num(value)
    return None


def batch_size(record: Record) -> float | None:
    return num(record.config.get("batch_size"))


def mode_rank(record: Record) -> int:
    mode = record.config.get("mode")
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


# The engine's defaults for the compiled step's other kernels (engine/linear.py MATVEC_KERNEL,
# engine/parallel/sharding.py's AUTO_ALL_REDUCE; a test keeps these equal, the report stays
# torch-free).
DEFAULT_MATVEC_KERNEL, DEFAULT_TP_ALL_REDUCE = "triton", "triton"
DEFAULT_PDL = True  # generate --pdl, on where it can run (kernels/pdl.py); unrecorded: without
DEFAULT_ARGMAX_PARTS = 64  # engine/sampling.py's, since 2026-12-06 (0, torch's, before it)
DEFAULT_FUSED_HEAD = False  # engine/model.py's FUSED_HEAD "off": the final norm apart from the head
DEFAULT_EARLY_RELEASE = True  # kernels/pdl.py's EARLY_RELEASE "on": released before the wait
DEFAULT_ATTENTION_RELEASE = "auto"  # kernels/pdl.py's ATTENTION_RELEASE: by the step's size
DEFAULT_SILU_BLOCK = 1024  # kernels/swiglu.py's BLOCK: the activation kernel's columns a program
DEFAULT_COMPILE_TUNING = "on"  # engine/generator.py's COMPILE_TUNING: inductor tunes by timing
# generate --prefill-graphs (engine/prefill_buckets.py's PREFILL_GRAPHS[0]); a Result records it
# as config.prefill_graphs (None where the prefill was not bucketed). "static" was the default
# until commit e2ae286 (2026-12-05 14:29 UTC): a Result made before then ran the default with it
DEFAULT_PREFILL_GRAPHS, EARLIER_PREFILL_GRAPHS = "layer", "static"
LAYER_PREFILL_SINCE = datetime(2026, 12, 5, 14, 29, 39, tzinfo=timezone.utc)
# generate --step-kernels: "auto" (engine/step_choice.py); a Result records how its kernels
# were chosen as config.step_choice ("auto: ..." or "asked: ..."); one from before that ran the
# kernels asked for, and split was the default
DEFAULT_STEP_KERNELS = "split"
# generate --moe-kernel (engine/moe.py); a Result records the kind asked as
# config.moe_kernel_asked since 2026-12-06 (_moe_off_default says how earlier ones are read);
# before that day torch's experts were the default (config.moe_kernel "torch"; unrecorded: torch)
DEFAULT_MOE_KERNEL, EARLIER_MOE_KERNEL = "auto", "torch"


def _early_block_off_default(cfg: dict) -> bool:
    """A one-block split program's load asked by name (config.early_block_way "on" or "off";
    "auto" chooses by step, the default since 2026-12-07); before that field the block loaded
    after the wait (config.early_block false) was the A/B's way, "on" the default."""
    if "early_block_way" in cfg:
        return cfg["early_block_way"] not in (None, "auto")
    return cfg.get("early_block") is False


def _attention_release_off_default(cfg: dict) -> bool:
    """The fused norm + wqkv and split kernels' release asked by name
    (config.attention_release_asked "after", "before", "split" or "wqkv"; "auto" chooses by
    the step's size, the default since 2026-12-08); before that field "after" was the default
    and "before" (config.attention_release) the A/B's way."""
    if "attention_release_asked" in cfg:
        return cfg["attention_release_asked"] not in (None, DEFAULT_ATTENTION_RELEASE)
    return cfg.get("attention_release") == "before"


def off_default_kernels(record: Record) -> bool:
    """The Result ran another decode attention than the default ("auto") picks at its batch,
    inductor's matrix-vector products (the GEMV is the default), other all-reduces than
    auto's Triton kernel on GPUs (NCCL, one-shot, triton-unfused), another --pdl than the
    default, a step's kernels asked for by name rather than left to "auto"
    (config.step_choice; before it was recorded: other than split), a step whose kernels
    prefetched weights into L2 (config.prefetch past 0; kernels/prefetch.py, off by default),
    a decode attention launched other than both kernels under PDL, with other pipeline stages
    or with a one-block program's block loaded where its step's default would not
    (config.attention_pdl, config.split_stages; config.early_block_way other than "auto", or
    before that field, the default "on" until 2026-12-07, config.early_block false;
    kernels/decode_attention.py, an A/B's), its
    combine folded into wo (config.combine_in_wo, in Results until 2026-12-07, when that A/B's
    kernel was removed) or run
    unsplit (config.attention_unsplit; kernels/decode_attention.py, an A/B's), an A/B's
    baseline run of an older source tree (config.ab.baseline) or a run with a setting made
    outside the engine, in its environment (config.ab.environment, e.g. inductor's PDL for
    every compile: TORCHINDUCTOR_ENABLE_PDL=1), the argmax over a row in
    a number of parts other than the default's (config.argmax_parts other than 0, the
    default until 2026-12-06, and sampling.DEFAULT_ARGMAX_PARTS, the default since),
    the fused kernels' tiles taken from elsewhere than their table (config.fused_tiles_from;
    kernels/fused_step.py, an A/B's), the final norm and head fused other than by default
    (config.fused_head; engine/model.py's FUSED_HEAD), the fused products releasing the next
    kernel after their PDL wait (config.early_release false; kernels/pdl.py's EARLY_RELEASE
    "off", an A/B's since "on" became the default on 2026-12-07), the fused norm + wqkv and
    split kernels' release asked by name (_attention_release_off_default; kernels/pdl.py's
    ATTENTION_RELEASE), the SwiGLU activation kernel
    at other columns a program than its default (config.silu_block; kernels/swiglu.py's BLOCK,
    an A/B's),
    a step compiled without inductor's tuning by timing (config.compile_tuning "off";
    engine/generator.py's COMPILE_TUNING, an A/B's),
    a bucketed prefill compiled other than
    by the default of the Result's day (config.prefill_graphs: they set the TTFT, and the
    process's compile may set the step's speed, docs/engine.md), or Triton's gathered experts
    (--moe-kernel): a comparison run (e.g. the generation sweep's kernel or gemv part), not the
    representative. A Result from before a setting was
    recorded ran what existed then: inductor's reductions and NCCL's all-reduces."""
    cfg = record.config
    if cfg.get("mode") != "compiled":
        return False
    kind = cfg.get("decode_attention")
    attention_off = bool(kind) and kind != resolve_attention("auto", batch_size(record) or 1)
    matvec = cfg.get("matvec_kernel") or "inductor"  # unrecorded: it ran before the GEMV existed
    # unrecorded: one GPU (no all-reduce), or tensor parallelism from before the setting (NCCL)
    unrecorded = "nccl" if _tensor_parallel(cfg) else DEFAULT_TP_ALL_REDUCE
    all_reduce = cfg.get("tp_all_reduce") or unrecorded
    return (attention_off or matvec != DEFAULT_MATVEC_KERNEL
            or all_reduce != DEFAULT_TP_ALL_REDUCE or bool(cfg.get("pdl")) != DEFAULT_PDL
            or _step_off_default(cfg) or bool(num(cfg.get("prefetch")))
            or cfg.get("attention_pdl") not in (None, "both")
            or bool(num(cfg.get("split_stages"))) or bool(cfg.get("combine_in_wo"))
            or bool(cfg.get("attention_unsplit")) or _early_block_off_default(cfg)
            or cfg.get("fused_tiles_from") not in (None, "table")
            or cfg.get("fused_head") not in (None, DEFAULT_FUSED_HEAD)
            or cfg.get("early_release") not in (None, DEFAULT_EARLY_RELEASE)
            or _attention_release_off_default(cfg)
            or cfg.get("silu_block") not in (None, DEFAULT_SILU_BLOCK)
            or cfg.get("compile_tuning") not in (None, DEFAULT_COMPILE_TUNING)
            or _prefill_off_default(record)
            or bool(dig(cfg, "ab", "baseline")) or bool(dig(cfg, "ab", "environment"))
            or _argmax_parts(cfg) not in (0, DEFAULT_ARGMAX_PARTS)
            or _moe_off_default(cfg, record.model))


def _tensor_parallel(cfg: dict) -> bool:
    """The Result ran on more than one rank (config.tp; unrecorded: one)."""
    return (num(cfg.get("tp")) or 1) > 1


def _moe_off_default(cfg: dict, model: dict) -> bool:
    """The experts were asked for by name (config.moe_kernel_asked other than "auto"); in a
    Result of 2026-12-06 made before the asked kind was recorded (config.moe_fused_step
    present), ran other than "auto" runs at its batch (Triton's at one token and past E / k,
    torch's between: specs/expert_memory.uses_triton); in an older Result, ran other than
    torch's, then the default."""
    asked = cfg.get("moe_kernel_asked")
    if asked is not None:
        return asked != DEFAULT_MOE_KERNEL
    kernel = cfg.get("moe_kernel")
    if kernel is None:
        return False
    if "moe_fused_step" not in cfg:
        return kernel != EARLIER_MOE_KERNEL
    batch = int(num(cfg.get("batch_size")) or 1)
    experts, top_k = num(model.get("n_experts")) or 0, num(model.get("n_active_experts")) or 1
    auto = "triton" if uses_triton(DEFAULT_MOE_KERNEL, batch, top_k, experts) else "torch"
    return kernel != auto


def _prefill_off_default(record: Record) -> bool:
    """The bucketed prefill's graphs (as run) were not the default of the Result's day: other
    than "layer", save "static" where the default runs it (under tensor parallelism and the
    cudagraphs backend: engine/generator.py's Generator.prefill_graphs) and in a Result made
    before "layer" became the default (one without a readable timestamp: made after)."""
    cfg = record.config
    graphs = cfg.get("prefill_graphs")
    if graphs in (None, DEFAULT_PREFILL_GRAPHS):
        return False
    if graphs == EARLIER_PREFILL_GRAPHS and (_tensor_parallel(cfg)
                                             or cfg.get("compile_backend") == "cudagraphs"):
        return False
    made = _made_at(record)
    if made is None:
        return True
    return graphs != EARLIER_PREFILL_GRAPHS or made >= LAYER_PREFILL_SINCE


def _step_off_default(cfg: dict) -> bool:
    """The step's kernels were not the default's: asked for by name (config.step_choice
    "asked: ..."), or, in a Result from before step_choice was recorded, other than split."""
    choice = cfg.get("step_choice")
    if choice is not None:
        return not str(choice).startswith("auto")
    return (cfg.get("step_kernels") or DEFAULT_STEP_KERNELS) != DEFAULT_STEP_KERNELS


def _made_at(record: Record) -> datetime | None:
    """When the Result was made (env.timestamp, ISO 8601; one without a zone, as a Result
    written by hand may have, read as UTC), None where it is not readable."""
    try:
        made = datetime.fromisoformat(str(record.env.get("timestamp")))
    except ValueError:
        return None
    return made if made.tzinfo is not None else made.replace(tzinfo=timezone.utc)


def _newest_first(record: Record) -> float:
    """A sort key putting the latest env.timestamp first among otherwise equal Results (a case
    re-measured with later code); one without a readable timestamp comes last."""
    made = _made_at(record)
    return math.inf if made is None else -made.timestamp()


def _earlier_default(record: Record) -> bool:
    """A Result that ran a default since replaced, where one of today's is otherwise its
    equal: the argmax over a row in one reduction (config.argmax_parts 0, or from before the
    field) where DEFAULT_ARGMAX_PARTS parts are the default now. One A/B process times both
    ways with one timestamp, so newest-first alone cannot tell them apart."""
    return _argmax_parts(record.config) != DEFAULT_ARGMAX_PARTS


def _argmax_parts(cfg: dict) -> float:
    """The parts the step's argmax reduced a row in: config.argmax_parts, 0 (one reduction)
    where the Result is from before the field."""
    return num(cfg.get("argmax_parts")) or 0


PREFILL_ONLY = 2  # new tokens at most: a prefill timed with one step after it (TTFT's runs)


def times_generation(record: Record) -> bool:
    """A Result that measured generation: timed, and more than PREFILL_ONLY new tokens (a
    32k-token prompt's TTFT run with 2 new tokens would read as 0.8 tok/s)."""
    new_tokens = num(record.config.get("max_new_tokens"))
    return has_timing(record) and (new_tokens is None or new_tokens > PREFILL_ONLY)


def pick_generate(column: Column) -> Record | None:
    """The generate Result that represents the column's token rows: batch 1, fixed length,
    compiled, the default kernels, then the seed's shape (see rank), the newest first."""
    def rank(record: Record) -> tuple:
        cfg = record.config
        new_tokens = num(cfg.get("max_new_tokens"))
        return (batch_size(record) != 1, bool(cfg.get("until_eos")),
                bool(cfg.get("prefill_ladder")), mode_rank(record),
                off_default_kernels(record), _earlier_default(record),
                _context_distance(cfg.get("cache_len", cfg.get("max_seq_len"))),
                abs(new_tokens - SEED_NEW_TOKENS) if new_tokens else math.inf,
                _context_distance(context(record)), _newest_first(record), record.source)

    timed = [r for r in column.generates if times_generation(r)]
    return min(timed, key=rank) if timed else None


def pick_traced(column: Column, part: str = "categories") -> Record | None:
    """The column's generate Result whose decode-step breakdown (--trace) holds `part`
    (categories; step_gaps: GPU traces only): batch 1 and the compiled mode first, then by
    source (the same files always give the same pick)."""
    found = [r for r in column.generates
             if isinstance(r.metrics.get("breakdown"), dict)
             and r.metrics["breakdown"].get(part)]
    return min(found, key=lambda r: (batch_size(r) != 1, r.config.get("mode") != "compiled",
                                     r.source), default=None)


def pick_kv(column: Column) -> Record | None:
    def rank(record: Record) -> tuple:
        return (batch_size(record) != 1, _context_distance(record.config.get("seq_len")),
                record.source)

    usable = [r for r in column.kvs if num(r.metrics.get("kv_cache_bytes"))]
    return min(usable, key=rank) if usable else None
