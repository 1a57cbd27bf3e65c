"""Checks of the split-KV decode attention's one-launch combine (COMBINE "last",
engine/kernels/decode_attention.py), run by tests/test_decode_combine.py in a subprocess with
TRITON_INTERPRET=1. "last" must give "separate"'s output to the bit: the same partials, the same
combine code in the same order of splits; only which program runs the combine changes. Exits
non-zero with the failing check's message; prints "ok" at the end."""

from __future__ import annotations

import torch

from infermeter.engine.kernels import decode_attention as kernels
from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.decode_attention import (
    BLOCK_N,
    _split_kv_decode,
    combine_counter,
    split_kv_decode_last,
)

# (batch, KV heads, G, head dim, splits, ring, window, soft cap, sinks, dtype): GQA's G of 1, 4
# and 8, heads of 64 and 128, splits 1, 3 and many (17 splits of 18 slots: those after the
# position are empty), a ring (sliding-window) layer, Gemma 2's cap, gpt-oss's sinks, float32
# and bfloat16 (the interpreter's bfloat16 tl.dot gives wrong values, but the same wrong values
# to both paths: what is checked here is who combines; the gpu test checks bfloat16's values)
CASES = [
    (1, 2, 1, 64, 1, False, 0, 0.0, False, torch.float32),
    (2, 2, 4, 128, 3, False, 0, 0.0, False, torch.float32),
    (1, 2, 8, 64, 17, False, 0, 0.0, False, torch.float32),
    (1, 2, 4, 64, 3, True, 9, 0.0, False, torch.float32),
    (1, 2, 4, 64, 17, False, 0, 50.0, False, torch.float32),
    (2, 1, 8, 128, 3, False, 0, 0.0, True, torch.float32),
    (1, 2, 1, 128, 17, True, 0, 0.0, True, torch.bfloat16),
    (1, 2, 4, 64, 3, False, 0, 30.0, False, torch.bfloat16),
    (2, 2, 8, 64, 1, False, 0, 0.0, True, torch.bfloat16),
]
SLOTS, POS = 5 * BLOCK_N - 14, 200  # a ragged last block; splits beyond the position


def inputs(case: tuple, seed: int) -> tuple:
    """q [B, H_kv, G, D], caches [B, H_kv, S, D], key_pos [S], sinks [H_kv * G] or None."""
    batch, n_kv, groups, dim, _, ring, _, _, sinks, dtype = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv, groups, dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, n_kv, SLOTS, dim, generator=gen).to(dtype) for _ in range(2))
    if ring:  # slots hold scattered positions, some never written (-1)
        key_pos = torch.randperm(SLOTS, generator=gen) - 3
        key_pos[key_pos == POS] = -1
        key_pos[POS % SLOTS] = POS
    else:
        key_pos = torch.arange(SLOTS)
    sink = (torch.randn(n_kv * groups, generator=gen) * 2).to(dtype) if sinks else None
    return q, k, v, key_pos, sink


def attend(case: tuple, tensors: tuple, combine: str, use_pdl: bool = False) -> torch.Tensor:
    _, _, _, _, splits, ring, window, cap, _, _ = case
    q, k, v, key_pos, sink = tensors
    return _split_kv_decode(q, k, v, key_pos, torch.tensor([POS]), window, ring, splits, cap,
                            use_pdl, sink, combine=combine)


def check_last_equals_separate() -> None:
    """Every case: "last" equals "separate" bit for bit, the counter is back at 0 after each
    call, and a second call (new inputs, then the first ones again) gives the same bits."""
    for i, case in enumerate(CASES):
        first, second = inputs(case, i), inputs(case, 100 + i)
        want = attend(case, first, "separate")
        rows = case[0] * case[1]
        counter = combine_counter(want.device, rows)
        for again, tensors in enumerate((first, second, first)):
            got = attend(case, tensors, "last")
            assert not counter.any(), f"case {case}: counter {counter.tolist()} after call {again}"
            expected = want if tensors is first else attend(case, second, "separate")
            assert got.dtype == case[-1] and torch.equal(got, expected), \
                f"case {case} call {again}: last differs from separate by " \
                f"{(got.float() - expected.float()).abs().max().item()}"
        # as the op runs it: the custom op, with and without the PDL flag (PDL itself is
        # compiled in on a GPU only)
        q, k, v, key_pos, sink = first
        for use_pdl in (False, True):
            got = split_kv_decode_last(q, k, v, key_pos, torch.tensor([POS]), case[6], case[5],
                                       case[4], case[7], sink, use_pdl)
            assert torch.equal(got, want), f"case {case}: the op (pdl {use_pdl}) differs"
        assert not counter.any(), f"case {case}: the op left counts {counter.tolist()}"


def check_compiled_step() -> None:
    """torch.compile (fullgraph) traces the model's one-token step with COMBINE "last" into the
    one-launch op (an opaque custom op: the interpreter cannot run under dynamo's fake tensors,
    so the "separate" step is compiled as its PDL twin, also opaque), and the two compiled
    steps' logits are the same bits, with and without PDL."""
    from infermeter.engine.linear import set_matvec_kernel
    from infermeter.engine.model import build_model
    from infermeter.specs.presets import PRESETS

    spec = PRESETS["debug"].with_updates(arch="mistral", sliding_window=5,
                                         sliding_window_layers=(1,))
    tokens = torch.randint(0, spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    graphs, logits = [], {}

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for combine, use_pdl in (("separate", True), ("last", False), ("last", True)):
        kernels.set_combine(combine)
        model = build_model(spec, seed=4)
        model.setup_cache(1, 16)
        set_matvec_kernel(model, "inductor")  # the attention's op alone is the Triton one
        for layer in model.layers:
            layer.attention.decode_attention = "triton"
            layer.feed_forward.activation_kernel = "aten"
        step = torch.compile(model, fullgraph=True, dynamic=False, backend=keep)
        with torch.inference_mode(), pdl.launching(use_pdl):
            outs = [model(tokens[:, :4], torch.arange(4))]
            outs += [step(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 9)]
        logits[combine, use_pdl] = torch.cat(outs, dim=1)
        targets = [str(node.target) for node in graphs[-1].graph.nodes]
        op = "split_kv_decode_last" if combine == "last" else "split_kv_decode_pdl"
        assert targets.count(f"infermeter.{op}.default") == spec.n_layers, (combine, targets)
        torch._dynamo.reset()
    kernels.set_combine("separate")
    for key in (("last", False), ("last", True)):
        assert torch.equal(logits[key], logits["separate", True]), f"{key}: logits differ"


if __name__ == "__main__":
    check_last_equals_separate()
    check_compiled_step()
    print("ok")
