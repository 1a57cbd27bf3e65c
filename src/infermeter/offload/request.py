"""What `infermeter offload` is asked to do: one frozen object from the command line to the
timed loop, checked once (lists not empty, lengths positive) so that scripts calling the job
get the same one-line errors as the command."""

from __future__ import annotations

from dataclasses import dataclass

from infermeter.errors import InfermeterError

WAYS = ("serial", "layerwise", "recompute")  # (a) reload then prefill, (b) overlapped, (c)
TRAFFIC_DIRECTIONS = ("d2h", "h2d", "both")  # traffic.DIRECTIONS, without importing torch
TRAFFIC_METHODS = ("dma", "mapped")  # traffic.METHODS: copy engines, an SM kernel
PAGED_COPIES = ("dma", "mapped")  # paged.PAGED_COPIES: a DMA per block, a gather kernel a pool


@dataclass(frozen=True)
class OffloadRequest:
    source: str  # checkpoint folder or file, or "random:<model>"
    prefix_lens: tuple[int, ...]  # tokens whose KV sits in host memory
    suffix_lens: tuple[int, ...]  # new tokens prefilled after it
    batch_size: int = 1
    device: str = "cpu"
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    kv_dtype: str | None = None  # None: the weights' dtype
    new_tokens: int = 4  # greedy tokens generated, untimed, to check the three ways agree
    prefill_chunk: int | None = None  # the longest forward a prefill runs (Generator's)
    max_seq_len: int | None = None  # a fixed KV-cache length for every case
    lookahead: int | None = None  # layer-wise: copies issued ahead (None: all the staging allows)
    block_sizes: tuple[int, ...] = ()  # also reload from a paged host copy, blocks of N tokens
    paged_copies: tuple[str, ...] = ()  # how a paged reload copies: "dma", "mapped"; () dma
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    # decode under copy traffic (traffic.py): none unless directions are given
    traffic: tuple[str, ...] = ()  # "d2h", "h2d", "both"
    traffic_methods: tuple[str, ...] = ()  # "dma", "mapped"; () both on a GPU, dma on the CPU
    context: int | None = None  # tokens in the cache when the decode starts (None: longest prefix)
    decode_steps: int = 32  # decode steps a timed window
    offloaded_decode: bool = False  # also decode with the KV cache streamed from host memory
    trace: str | None = None  # a folder: a profiler trace of a few offloaded decode steps

    def __post_init__(self) -> None:
        for name in ("prefix_lens", "suffix_lens"):
            values = getattr(self, name)
            flag = "--" + name[:-1].replace("_", "-")
            if not values:
                raise InfermeterError(f"{flag}: give at least one length")
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise InfermeterError(f"{flag}: lengths must be positive integers, got "
                                      f"{list(values)}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        checks = {"--batch-size": self.batch_size, "--new-tokens": self.new_tokens,
                  "--repeats": self.repeats, "--prefill-chunk": self.prefill_chunk or 1,
                  "--max-seq-len": self.max_seq_len or 1, "--lookahead": self.lookahead or 1}
        checks.update({"--context": self.context or 1, "--decode-steps": self.decode_steps})
        for flag, value in checks.items():
            if value < 1:
                raise InfermeterError(f"{flag} must be at least 1, got {value}")
        if self.warmup < 0:
            raise InfermeterError(f"--warmup must not be negative, got {self.warmup}")
        unknown = [d for d in self.traffic if d not in TRAFFIC_DIRECTIONS]
        if unknown:
            raise InfermeterError(f"--traffic: unknown direction {unknown[0]!r} (use "
                                  f"{', '.join(TRAFFIC_DIRECTIONS)})")
        object.__setattr__(self, "traffic", tuple(dict.fromkeys(self.traffic)))
        unknown = [m for m in self.traffic_methods if m not in TRAFFIC_METHODS]
        if unknown:
            raise InfermeterError(f"--traffic-method: unknown method {unknown[0]!r} (use "
                                  f"{', '.join(TRAFFIC_METHODS)})")
        if self.traffic_methods and not self.traffic:
            raise InfermeterError("--traffic-method: give --traffic DIRECTION too (the methods "
                                  "are those of the decode-under-traffic copies)")
        object.__setattr__(self, "traffic_methods", tuple(
            m for m in TRAFFIC_METHODS if m in self.traffic_methods))
        if self.trace and not self.offloaded_decode:
            raise InfermeterError("--trace profiles the offloaded decode: give "
                                  "--offloaded-decode too")
        if any(not isinstance(n, int) or n < 1 for n in self.block_sizes):
            raise InfermeterError(f"--block-size: sizes must be positive integers, got "
                                  f"{list(self.block_sizes)}")
        object.__setattr__(self, "block_sizes", tuple(sorted(set(self.block_sizes))))
        unknown = [m for m in self.paged_copies if m not in PAGED_COPIES]
        if unknown:
            raise InfermeterError(f"--paged-copy: unknown method {unknown[0]!r} (use "
                                  f"{', '.join(PAGED_COPIES)})")
        # the default's normalized form passes, so that a dataclasses.replace keeps working
        if set(self.paged_copies) - {"dma"} and not self.block_sizes:
            raise InfermeterError("--paged-copy: give --block-size too (the methods are those "
                                  "of the paged host copy's reload)")
        object.__setattr__(self, "paged_copies", tuple(
            m for m in PAGED_COPIES if m in self.paged_copies) or ("dma",))

    @property
    def traffic_context(self) -> int:
        return self.context or max(self.prefix_lens)
