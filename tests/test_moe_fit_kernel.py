"""generate's fit check counts the gathered experts' copy only where the torch kernel makes it:
--moe-kernel triton reads the chosen experts in the stacked weights by id (expert_gemv.py); it
counts instead the grouped kernels' intermediates of a prefill with more pairs than experts
(expert_gemm.py: one layer's [pairs, moe_ffn] and [pairs, dim]). The exact compiled prefill's
layer buffers count where the Generator replays the layers (layer_replays.replays_prefill_layers,
one rule for both): with --compile-prefill, on a GPU, one rank, dense or on the Triton experts."""

from types import SimpleNamespace

import torch

from infermeter.generate import memory
from infermeter.generate.memory import case_memory
from infermeter.specs.expert_memory import gathered_expert_bytes
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
        auto_parts = case_memory(MIXTRAL, batch, 16, 256, "bfloat16", "bfloat16", "compiled",
                                 tp=tp)  # "auto", the default
        copy = gathered_expert_bytes(MIXTRAL, batch, "bfloat16") // tp
        # auto: Triton's at one row and past E / k (the prefill), torch's copy at batch 4
        assert auto_parts == {**triton_parts, **({"gathered expert weights": copy}
                                                 if batch > 1 else {})}
        assert copy > 0 and torch_parts.pop("gathered expert weights") == copy
        # the 16-token prefill: 32 pairs a sequence of 8 experts, grouped
        assert triton_parts.pop("grouped expert activations") == grouped(16 * batch, tp)
        assert torch_parts == triton_parts


def test_auto_counts_triton_s_parts_at_batch_1_and_torch_s_copy_between() -> None:
    """--moe-kernel auto (the default): Triton's gathered kernels at batch 1 (no copy), torch's
    gathered indexing at 2 to E / k rows (its copy), the grouped kernels' intermediates for a
    prefill past E / k either way (a bucketed prefill, no host sync)."""
    def parts(batch: int, kind: str) -> dict[str, int]:
        return case_memory(MIXTRAL, batch, 16, 256, "bfloat16", "bfloat16", "compiled",
                           moe_kernel=kind)

    assert parts(1, "auto") == parts(1, "triton")
    at_4 = parts(4, "auto")
    assert at_4["gathered expert weights"] == gathered_expert_bytes(MIXTRAL, 4, "bfloat16")
    assert at_4["grouped expert activations"] == grouped(16 * 4, 1)
    assert "gathered expert weights" not in parts(4, "triton")

def test_a_short_prefill_that_gathers_counts_its_rows_copy() -> None:
    """A prefill forward of N rows with N x k <= E gathers too: Qwen3-30B-A3B (8 of 128
    experts) at batch 1 with a 16-token prompt copies 16 rows' experts under torch's and
    "auto"'s way (2 to E / k rows), none under Triton's; a 4-token last chunk of a 20-token
    prompt in 16-token forwards gathers 4 rows' where the 16-token one (also gathering) is the
    larger; past E / k rows (a 17-token forward) nothing gathers but the decode batch."""
    qwen = PRESETS["qwen3-30b-a3b"]

    def copy(prompt: int, kind: str, chunk: int | None = None) -> int | None:
        return case_memory(qwen, 1, prompt, 64, "bfloat16", "bfloat16", "eager",
                           prefill_chunk=chunk, moe_kernel=kind).get("gathered expert weights")

    rows = lambda n: gathered_expert_bytes(qwen, n, "bfloat16")  # noqa: E731
    assert copy(16, "auto") == copy(16, "torch") == rows(16)
    assert copy(16, "triton") is None
    assert copy(20, "auto", chunk=16) == rows(16)
    assert copy(17, "auto") is None and copy(17, "torch") == rows(1)  # the decode step's


def test_the_fit_checks_rule_is_the_engines():
    """One rule (specs/expert_memory.uses_triton) for the engine and the fit checks: the
    engine's name is that function; for rows that gather (rows x k <= E), torch's way (the
    copy) under "torch" always, under "auto" past one row, under "triton" never."""
    from infermeter.engine import moe
    from infermeter.specs import expert_memory

    assert moe.uses_triton is expert_memory.uses_triton
    for kind in moe.MOE_KERNELS:
        for rows in range(1, 17):
            torch_way = kind == "torch" or (kind == "auto" and rows > 1)
            assert torch_way == (not expert_memory.uses_triton(kind, rows, 8, 128))
    assert [expert_memory.takes_triton(kind) for kind in moe.MOE_KERNELS] == [True, False, True]

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


# ---- the exact compiled prefill's layer replays (engine/layer_replays.py) -------------------
LLAMA = PRESETS["llama-2-7b"]


def _buffers(spec, moe_kernel: str = "torch", **kw) -> int | None:
    """The "prefill layer buffers" part of a batch-2, 16-token exact compiled case (None where
    it is not counted); keywords override case_memory's."""
    args = {"tp": 1, "prefill": "exact", "moe_kernel": moe_kernel, "compile_prefill": True,
            "on_gpu": True, **kw}
    mode = args.pop("mode", "compiled")
    return case_memory(spec, 2, 16, 256, "bfloat16", "bfloat16", mode, **args).get(
        "prefill layer buffers")


def test_a_dense_exact_compiled_prefill_counts_its_layer_buffers() -> None:
    """Two [B, T, dim] bf16 buffers, only where the Generator replays the layers: not without
    --compile-prefill, off a GPU, under tensor parallelism, bucketed, eager, nor for a prefill
    of one-token forwards."""
    assert _buffers(LLAMA) == 2 * 2 * 16 * 4096 * 2
    for change in ({"compile_prefill": False}, {"on_gpu": False}, {"tp": 2},
                   {"prefill": "bucketed"}, {"mode": "eager"}, {"prefill_chunk": 1}):
        assert _buffers(LLAMA, **change) is None, change


def test_an_moe_prefill_counts_its_layer_buffers_only_on_the_triton_experts() -> None:
    """The Triton experts group their pairs without a host sync, so the exact prefill's layers
    are replayed and their buffers counted; the torch experts' loop asks the host: no replays."""
    assert _buffers(MIXTRAL, "triton") == 2 * 2 * 16 * 4096 * 2
    assert _buffers(MIXTRAL, "torch") is None
    assert _buffers(MIXTRAL, "triton", compile_prefill=False) is None
    # bucketed is asked but the torch experts prefill exactly: still no replays
    assert _buffers(MIXTRAL, "torch", prefill="bucketed") is None


def test_the_fit_check_passes_compile_prefill_and_the_device(monkeypatch) -> None:
    """check_cases_fit counts the buffers of a compiled case on a CUDA device with
    --compile-prefill and the Triton experts, and not on the CPU (no graphs there)."""
    seen = []
    monkeypatch.setattr(memory, "free_memory", lambda device: (1 << 60, "free"))
    monkeypatch.setattr(memory, "host_available", lambda: 1 << 60)
    monkeypatch.setattr(memory, "triton_runs_on_device", lambda device: True)
    monkeypatch.setattr(memory, "check_fit", lambda what, parts, *rest: seen.append(parts))
    prompts = SimpleNamespace(length_range=(16, 16), prompt_tokens=16, batch_size=1)
    case = SimpleNamespace(prompt_set=prompts, largest_group=1, cache_len=256, mode="compiled",
                           label="batch 1")

    def buffers(device: str, moe_kernel: str, compile_prefill: bool) -> int | None:
        seen.clear()
        memory.check_cases_fit(MIXTRAL, [case], "bfloat16", "bfloat16", torch.device(device),
                               prefill="exact", moe_kernel=moe_kernel,
                               compile_prefill=compile_prefill)
        return seen[0].get("prefill layer buffers")

    assert buffers("cuda", "triton", True) == 2 * 16 * 4096 * 2
    assert buffers("cuda", "torch", True) is None
    assert buffers("cuda", "triton", False) is None
    assert buffers("cpu", "triton", True) is None


def test_the_generator_and_the_fit_check_agree_on_the_replays(monkeypatch) -> None:
    """Over dense and MoE models, both expert kernels, compile_prefill, bucketed or exact,
    compiled or eager, GPU or CPU, one rank or two, and forwards of 16 tokens or 1: the
    Generator replays the prefill's layers exactly where case_memory counts their buffers.
    (The device and the ranks are set on the Generator as its rule reads them; nothing runs.)"""
    from infermeter.engine import moe as moe_module
    from infermeter.engine.generator import Generator
    from infermeter.engine.model import build_model
    from infermeter.engine.moe import set_moe_kernel

    monkeypatch.setattr(moe_module, "triton_runs_on", lambda x: True)
    tiny = {"n_layers": 2, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "ffn_dim": 64, "vocab_size": 64, "max_seq_len": 64}
    specs = {"dense": PRESETS["debug"].with_updates(**tiny),
             "moe": MIXTRAL.with_updates(**tiny, n_experts=4, n_active_experts=2,
                                         moe_ffn_dim=32)}
    outcomes = []
    for name, spec in specs.items():
        for compile_prefill in (False, True):
            for bucketed in (False, True):
                model = build_model(spec, device="cpu", dtype=torch.float32, seed=0)
                gen = Generator(model, max_seq_len=64, compile_prefill=compile_prefill,
                                bucketed_prefill=bucketed)
                for kernel in ("torch", "triton"):
                    set_moe_kernel(model, kernel)
                    for gpu in (False, True):
                        gen.device = torch.device("cuda" if gpu else "cpu")
                        for tp in (1, 2):
                            model.tp_collectives = None if tp == 1 else object()
                            for compiled in (False, True):
                                for prompt in (1, 16):
                                    replays = gen.replays_prefill(compiled, prompt)
                                    counted = "prefill layer buffers" in case_memory(
                                        spec, 1, prompt, 64, "float32", "float32",
                                        "compiled" if compiled else "eager", tp,
                                        prefill="bucketed" if bucketed else "exact",
                                        moe_kernel=kernel, compile_prefill=compile_prefill,
                                        on_gpu=gpu)
                                    case = (name, compile_prefill, bucketed, kernel, gpu, tp,
                                            compiled, prompt)
                                    assert replays == counted, case
                                    outcomes.append((case, replays))
    replayed = {case for case, replays in outcomes if replays}
    # dense (either kernel setting: no MoE block) and MoE on the Triton experts, exact only
    assert replayed == {(name, True, False, kernel, True, 1, True, 16)
                        for name, kernel in (("dense", "torch"), ("dense", "triton"),
                                             ("moe", "triton"))}
