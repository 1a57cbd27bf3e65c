"""The seed's published numbers, for `infermeter report --with-seed`.

The project started from profiling scripts around Meta's reference Llama code; their table for
Llama-2-7b-chat on an RTX 3090 is what infermeter replaces (docs/design.md). Those numbers were
typed from that table, not measured by infermeter, and the column says so. The seed's "12.2 GB/s" is
256 MiB / 21 ms in GiB/s (2^30); in infermeter's GB/s (1e9 bytes) the same copy is 12.8 GB/s,
which is what the column shows, with the seed's own figure beside it.
"""

from __future__ import annotations

from infermeter.report import format as fmt
from infermeter.report.select import Column, ColumnKey

KV_BYTES = 256 * 2**20  # 32 layers x [1, 512, 32, 128] fp16, K and V
MOVE_MS = 21.0  # each way
TOTAL_TOKENS = 432
GENERATION_S = 9.19

SEED_KEY = ColumnKey("RTX 3090 (seed scripts)", "llama-2-7b-chat", 1)
SOURCE = ("the seed's published table (Meta reference code, pageable .cpu()/.cuda() copies of the "
          "64 per-layer tensors); typed in, not measured by infermeter")


def seed_column() -> Column:
    return Column(SEED_KEY, seed={"source": SOURCE})


def reference_cells() -> list[str]:
    """The six reference rows below Device, in the report's units."""
    gbps = KV_BYTES / (MOVE_MS / 1e3) / 1e9
    return [f"{fmt.size(KV_BYTES)} (1×512)", fmt.pair(fmt.ms(MOVE_MS), fmt.ms(MOVE_MS)),
            f"{fmt.gbps(gbps)} each way (seed: 12.2 GiB/s)", fmt.count(TOTAL_TOKENS),
            fmt.seconds(GENERATION_S), fmt.tok_s(TOTAL_TOKENS / GENERATION_S)]


def headline_numbers() -> dict[str, float | None]:
    return {"h2d_gbps": KV_BYTES / (MOVE_MS / 1e3) / 1e9, "tok_per_s": TOTAL_TOKENS / GENERATION_S,
            "tpot_ms": None, "ttft_ms": None}
