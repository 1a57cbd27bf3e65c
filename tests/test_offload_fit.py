"""`infermeter offload`'s fit check counts the compiled prefill's layer-replay buffers (two
[B, T, dim], engine/layer_replays.py) by the Generator's own rule
(layer_replays.replays_prefill_layers) with the job's Generator's inputs: compiled through
compile_prefill on a GPU, never bucketed, one rank, MoE blocks on the default torch experts
(offload never sets a kernel). So a dense model on a GPU counts them at the longest replayed
forward; the CPU, one-token forwards and an MoE model do not."""

from __future__ import annotations

import pytest
import torch

from infermeter.offload.fit import (
    check_sizes_fit,
    offloaded_fit_parts,
    on_device_refusal,
    replays_offload_prefill,
)
from infermeter.offload.request import OffloadRequest
from infermeter.specs.presets import PRESETS

LLAMA, MIXTRAL = PRESETS["llama-3.1-8b"], PRESETS["mixtral-8x7b"]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _device_parts(monkeypatch, spec, device, **asked) -> dict[str, int]:
    """The parts check_sizes_fit weighs on the device (on the CPU: its one sum), nothing refused."""
    seen: list[dict[str, int]] = []
    monkeypatch.setattr("infermeter.offload.fit.check_fit",
                        lambda what, parts, *rest: seen.append(dict(parts)))
    monkeypatch.setattr("infermeter.offload.fit.free_memory", lambda d: (1 << 60, "free"))
    monkeypatch.setattr("infermeter.offload.fit.host_available", lambda: 1 << 60)
    request = OffloadRequest("random:" + spec.name, **{"prefix_lens": (512, 2048),
                                                      "suffix_lens": (64, 128),
                                                      "batch_size": 2, **asked})
    check_sizes_fit(spec, request, device, "bf16", "bf16")
    return seen[0]


def test_a_dense_model_on_a_gpu_counts_the_longest_forwards_two_buffers(monkeypatch):
    """Batch 2, the longest prompt 2,048 + 128 tokens, Llama-3.1-8B's 4,096-wide rows in bf16:
    two buffers of 2 x 2,176 x 4,096 x 2 bytes; one --prefill-chunk of 256 bounds them."""
    whole = _device_parts(monkeypatch, LLAMA, CUDA)
    assert whole["prefill layer buffers"] == 2 * (2 * 2176 * 4096 * 2)
    chunked = _device_parts(monkeypatch, LLAMA, CUDA, prefill_chunk=256)
    assert chunked["prefill layer buffers"] == 2 * (2 * 256 * 4096 * 2)
    # the --traffic decode's prompt (--context tokens) is a compiled prefill of the same
    # Generator: the buffers grow to it when it is the longer
    traffic = _device_parts(monkeypatch, LLAMA, CUDA, traffic=("d2h",), context=8192)
    assert traffic["prefill layer buffers"] == 2 * (2 * 8192 * 4096 * 2)


def test_the_cpu_counts_no_layer_buffers(monkeypatch):
    """On the CPU the job's prefills run eager: no graphs, no buffers."""
    assert "prefill layer buffers" not in _device_parts(monkeypatch, LLAMA, CPU)
    assert "prefill layer buffers" not in _device_parts(monkeypatch, LLAMA, CPU,
                                                        traffic=("d2h",), context=8192)


@pytest.mark.parametrize("spec, asked, experts", [
    (LLAMA, {"prefill_chunk": 1}, "triton"),  # forwards of one token run eager
    (MIXTRAL, {}, "torch"),  # the torch experts' loop asks the host: no replays
    (MIXTRAL, {"traffic": ("d2h",), "context": 8192}, "torch")])
def test_prefills_that_replay_nothing_count_no_layer_buffers(monkeypatch, spec, asked,
                                                             experts):
    monkeypatch.setattr("infermeter.engine.moe.MOE_KERNEL", experts)
    parts = _device_parts(monkeypatch, spec, CUDA, **asked)
    assert "prefill activations" in parts and "prefill layer buffers" not in parts


def test_an_moe_prefill_on_the_default_experts_counts_its_layer_buffers_and_groups(monkeypatch):
    """The engine's default experts ("auto") group a long forward's tokens in the Triton
    kernels with no host sync, so an MoE prefill replays its layers as a dense one does
    (Mixtral's two 4,096-wide bf16 buffers of the longest forward: batch 2, 2,176 tokens) and
    holds the grouped kernels' intermediates (2 x 2,176 rows x 2 experts, [pairs, 14,336] and
    [pairs, 4,096] in bf16); its decode batch of 2 (4 pairs of 8 experts) gathers torch's way,
    copying 2 rows' experts."""
    from infermeter.engine.moe import MOE_KERNEL
    from infermeter.specs.expert_memory import gathered_expert_bytes

    assert MOE_KERNEL == "auto"
    parts = _device_parts(monkeypatch, MIXTRAL, CUDA)
    assert parts["prefill layer buffers"] == 2 * (2 * 2176 * 4096 * 2)
    assert parts["grouped expert activations"] == 2 * 2176 * 2 * (14336 + 4096) * 2
    assert parts["gathered expert weights"] == gathered_expert_bytes(MIXTRAL, 2, "bf16")
    assert "grouped expert activations" not in _device_parts(monkeypatch, LLAMA, CUDA)


def test_the_offloaded_decode_still_holds_the_earlier_prefills_buffers(monkeypatch):
    """Its own prefill is eager, but the buffers of the cases' (and the --traffic decode's)
    prefills stay with the Generator: its phase and its on-device comparison count them."""
    request = OffloadRequest("random:llama-3.1-8b", (16,), (16,), batch_size=2, context=4096,
                             offloaded_decode=True, traffic=("h2d",))
    buffers = 2 * (2 * 4096 * 4096 * 2)  # the --traffic prompt is the longest forward
    assert offloaded_fit_parts(LLAMA, request, CUDA, "bf16", "bf16")[
        "prefill layer buffers"] == buffers
    assert "prefill layer buffers" not in offloaded_fit_parts(LLAMA, request, CPU, "bf16", "bf16")
    seen: list[dict[str, int]] = []
    monkeypatch.setattr("infermeter.offload.fit.check_fit",
                        lambda what, parts, *rest: seen.append(dict(parts)))
    monkeypatch.setattr("infermeter.offload.fit.free_memory", lambda d: (1 << 60, "free"))
    assert on_device_refusal(LLAMA, request, CUDA, "bf16", "bf16") is None
    assert seen[0]["prefill layer buffers"] == buffers


def test_the_jobs_generator_replays_exactly_where_the_fit_check_counts(monkeypatch):
    """The Generator run_offload builds (job.offload_generator), asked as its prefills ask it
    (a case's compiled flag is case.prefill_kind's), on a dense and an MoE model, on a GPU or
    the CPU, at forwards of 1 and 16 tokens: it replays its layers exactly where
    replays_offload_prefill says so. (The device is set on the Generator as its rule reads it,
    and Triton runs on "its" weights there, as on a GPU: the default Triton experts group an
    MoE prefill's tokens with no host sync; nothing runs.)"""
    from infermeter.engine import moe as moe_module
    from infermeter.engine.model import build_model
    from infermeter.offload.case import prefill_kind
    from infermeter.offload.job import offload_generator

    tiny = {"n_layers": 2, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "ffn_dim": 64, "vocab_size": 64, "max_seq_len": 64}
    specs = {"dense": PRESETS["debug"].with_updates(**tiny),
             "moe": MIXTRAL.with_updates(**tiny, n_experts=4, n_active_experts=2,
                                         moe_ffn_dim=32)}
    replayed = set()
    for name, spec in specs.items():
        for device in (CPU, CUDA):
            model = build_model(spec, device="cpu", dtype=torch.float32, seed=0)
            request = OffloadRequest("random:debug", (8,), (8,))
            generator = offload_generator(model, request, device, "float32")
            generator.device = device
            monkeypatch.setattr(moe_module, "triton_runs_on", lambda t, d=device: d == CUDA)
            compiled = prefill_kind(generator) == "compiled layers"
            assert compiled == (device.type == "cuda")  # the --traffic prompt's flag too
            for forward in (1, 16):
                replays = generator.replays_prefill(compiled, forward)
                assert replays == replays_offload_prefill(spec, device, forward), (
                    name, device, forward)
                if replays:
                    replayed.add((name, device.type, forward))
    assert replayed == {("dense", "cuda", 16), ("moe", "cuda", 16)}
