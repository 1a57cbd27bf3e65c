"""copy's memory check before anything is allocated: the host side counts every rank of the host
(under tensor parallelism they allocate at once)."""

import pytest
import torch

from infermeter.copy import job as copy_bench
from infermeter.copy.job import CopyRequest
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS


def test_host_memory_counts_every_rank_of_the_host(monkeypatch):
    req = CopyRequest(PRESETS["llama-2-7b"], seq_lens=(64,), layouts=("engine",),
                      hosts=("pageable",), directions=("d2h",), methods=("per-tensor",),
                      device="cpu")
    plans = req.plans(1, 64)
    seen = {}

    def host_available():
        seen["asked"] = True
        return seen["host"]

    monkeypatch.setattr(copy_bench, "host_available", host_available)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    seen["host"] = 10**15
    copy_bench.check_memory(req, plans, torch.device("cpu"))  # plenty: passes
    seen["host"] = 0
    with pytest.raises(InfermeterError, match="of host memory, but only"):
        copy_bench.check_memory(req, plans, torch.device("cpu"))
    # find what one rank needs: the smallest host figure that passes alone
    low, high = 0, 10**12
    while high - low > 1:
        mid = (low + high) // 2
        seen["host"] = mid
        try:
            copy_bench.check_memory(req, plans, torch.device("cpu"))
            high = mid
        except InfermeterError:
            low = mid
    one_rank = high
    seen["host"] = one_rank  # enough for one rank, not for two on this host
    copy_bench.check_memory(req, plans, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(InfermeterError, match="for each of this host's 2 ranks"):
        copy_bench.check_memory(req, plans, torch.device("cpu"))
    seen["host"] = 2 * one_rank
    copy_bench.check_memory(req, plans, torch.device("cpu"))
    assert seen["asked"]
