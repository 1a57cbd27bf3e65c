"""Synthetic report Records for the tests of report/select's choice of a column's Result."""

from __future__ import annotations

from infermeter.report.load import Record


def seed_record(line: int, **config) -> Record:
    """A compiled generate Record of the seed's shape (batch 1, an 80-token prompt, 432 new
    tokens in a 512-token cache) with today's default decode kernels and PDL; `config` adds or
    overrides settings. `line` tells Records apart (their source)."""
    config = {"batch_size": 1, "mode": "compiled", "prompt_len": 80, "max_new_tokens": 432,
              "cache_len": 512, "decode_attention": "triton", "matvec_kernel": "triton",
              "pdl": True, **config}
    return Record(kind="generate", model={"name": "m"}, config=config, env={},
                  metrics={"decode_tok_per_s": 100.0}, warnings=(), source=f"f:{line}")
