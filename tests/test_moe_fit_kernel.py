"""generate's fit check counts the gathered experts' copy only where the torch kernel makes it:
--moe-kernel triton reads the chosen experts in the stacked weights by id (expert_gemv.py); it
counts instead the grouped kernels' intermediates of a prefill with more pairs than experts
(expert_gemm.py: one layer's [pairs, moe_ffn] and [pairs, dim])."""

from types import SimpleNamespace

import torch

from infermeter.generate import memory
from infermeter.generate.memory import case_memory, gathered_expert_bytes
from infermeter.specs.presets import PRESETS

MIXTRAL = PRESETS["mixtral-8x7b"]  # 2 of 8 experts, each 3 x 4096 x 14336


def grouped(tokens: int, tp: int) -> int:
    """A prefill of `tokens` rows: 2 pairs a row, [pairs, 14336 / tp] and [pairs, 4096] bf16."""
    return tokens * 2 * (14336 // tp + 4096) * 2


def test_triton_parts_lack_exactly_the_gathered_copy() -> None:
    for batch, tp in ((1, 1), (4, 2)):
        torch_parts = case_memory(MIXTRAL, batch, 16, 256, "bfloat16", "bfloat16", "compiled",
                                  tp=tp, moe_kernel="torch")
        triton_parts = case_memory(MIXTRAL, batch, 16, 256, "bfloat16", "bfloat16", "compiled",
                                   tp=tp, moe_kernel="triton")
        copy = gathered_expert_bytes(MIXTRAL, batch, "bfloat16") // tp
        assert copy > 0 and torch_parts.pop("gathered expert weights") == copy
        # the 16-token prefill: 32 pairs a sequence of 8 experts, grouped
        assert triton_parts.pop("grouped expert activations") == grouped(16 * batch, tp)
        assert torch_parts == triton_parts
        assert sum(torch_parts.values()) + copy == sum(
            case_memory(MIXTRAL, batch, 16, 256, "bfloat16", "bfloat16", "compiled",
                        tp=tp).values())  # torch is the default


def _checked_parts(monkeypatch, moe_kernel: str, interpret: bool) -> dict[str, int]:
    """The device parts check_cases_fit weighs for one batch-1 MoE case on the CPU."""
    seen = []
    monkeypatch.setattr(memory, "free_memory", lambda device: (1 << 60, "free"))
    monkeypatch.setattr(memory, "check_fit", lambda what, parts, *rest: seen.append(parts))
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prompts = SimpleNamespace(length_range=(16, 16), prompt_tokens=16, batch_size=1)
    case = SimpleNamespace(prompt_set=prompts, largest_group=1, cache_len=256, mode="eager",
                           label="batch 1")
    memory.check_cases_fit(MIXTRAL, [case], "bfloat16", "bfloat16", torch.device("cpu"),
                           moe_kernel=moe_kernel)
    return seen[0]


def test_the_fit_check_counts_what_the_chosen_kernel_needs(monkeypatch) -> None:
    torch_parts = _checked_parts(monkeypatch, "torch", interpret=True)
    triton_parts = _checked_parts(monkeypatch, "triton", interpret=True)
    copy = gathered_expert_bytes(MIXTRAL, 1, "bfloat16")
    assert sum(torch_parts.values()) - sum(triton_parts.values()) == copy - grouped(16, 1)
    assert "gathered expert weights" not in triton_parts
    assert "grouped expert activations" not in torch_parts
    # where Triton cannot run, the torch path (and its copy) runs whatever was asked
    assert _checked_parts(monkeypatch, "triton", interpret=False) == torch_parts
