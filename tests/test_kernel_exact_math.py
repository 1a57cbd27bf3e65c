"""Eager's float32 maths in the activation and attention kernels (engine/kernels/exact_math.py).

On this CPU each op's launch is recorded as it runs, checked to ask for libdevice exactly where
a CUDA tensor would, and compiled for sm_90 as a CUDA tensor launches it: SwiGLU's silu (swiglu.py,
expert_gemv.py) divides exactly (div.rn) with libdevice's expf, as torch's CUDA silu; the decode
attention's soft cap is libdevice's tanhf of the score times cap's float32 reciprocal, as
torch.tanh(s / cap) on CUDA, and its combine divides exactly, as torch's softmax. The attention
keeps Triton's exp (ex2.approx) in its online softmax: its results match eager's within tolerances,
not bitwise (decode_attention.py says why). The interpreter's results are checked by each kernel's
worker. On a GPU (`gpu` tests) the silu kernels equal eager's to the bit, and the capped kernel the
math path within the softmax exp's few ulp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infermeter.engine.kernels import decode_attention, expert_gemv, swiglu
from tests.test_fused_step import assert_exact_divisions
from tests.test_peer_all_reduce import needs_triton

TL_EXP = "ex2.approx.f32"  # Triton's exp: ex2.approx of x * log2(e)
LIBDEVICE_EX2 = "ex2.approx.ftz.f32"  # inside libdevice's expf and tanhf (range-reduced first)


def launches_as_on_a_gpu(monkeypatch, module, call) -> list:
    """(kernel, args, kwargs) of each PDL launch call() makes on CPU tensors, checked to leave
    libdevice off there (the interpreter has none) and to turn it on where the module's
    compiled_for_gpu holds; the kwargs returned are the GPU's."""
    from tests.test_pdl import pdl_launches

    on_cpu = pdl_launches(monkeypatch, call)
    assert on_cpu and all(kwargs["LIBDEVICE"] is False for _, _, kwargs in on_cpu
                          if "LIBDEVICE" in kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(module, "compiled_for_gpu", lambda x: True)
        on_gpu = pdl_launches(patch, call)
    assert [k for k, _, _ in on_gpu] == [k for k, _, _ in on_cpu]
    assert all(kwargs.get("LIBDEVICE", True) is True for _, _, kwargs in on_gpu)
    return on_gpu


def gpu_ptx(launch) -> list[str]:
    from tests.test_pdl import sm90_lines

    return sm90_lines(*launch)[1]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_kernels_divide_exactly_with_libdevices_exp(monkeypatch, dtype):
    """The activation kernel and the experts' gate/up kernel (1 and 3 tokens), as on a GPU:
    silu's division is div.rn (none approximate) and its exp libdevice's expf, not tl.exp."""
    gate = torch.zeros(2, 1000, dtype=dtype)
    x, w = torch.zeros(3, 512, dtype=dtype), torch.zeros(6, 64, 512, dtype=dtype)
    ids = torch.tensor([[1, 4], [4, 0], [2, 1]])
    calls = {"silu_mul": (swiglu, lambda: swiglu._silu_mul(gate, gate, pdl=True)),
             "experts_swiglu batch 1": (expert_gemv, lambda: expert_gemv._experts_swiglu(
                 x[:1], ids[:1], w, w, pdl=True)),
             "experts_swiglu batch 3": (expert_gemv, lambda: expert_gemv._experts_swiglu(
                 x, ids, w, w, pdl=True))}
    for name, (module, call) in calls.items():
        (launch,) = launches_as_on_a_gpu(monkeypatch, module, call)
        lines = gpu_ptx(launch)
        assert_exact_divisions(lines, True, name)
        assert not [line for line in lines if TL_EXP in line], name
        assert any(LIBDEVICE_EX2 in line for line in lines), name


@needs_triton
@pytest.mark.parametrize("block, divisions", [(1024, 8), (256, 2), (128, 1)])
def test_the_activation_kernel_s_block_sets_the_exact_divisions_a_thread(monkeypatch, block,
                                                                         divisions):
    """swiglu.BLOCK (an A/B's setting): each of a program's 128 threads computes BLOCK / 128
    silus, each one div.rn in the sm_90 build, so 1024 gives a thread eight exact divisions
    and 128 one; the launch's grid follows (11,008 columns: 11 programs, 43, 86); set_block
    refuses a block it has no way for, and the value stays."""
    gate = torch.zeros(1, 11008, dtype=torch.float16)
    swiglu.set_block(block)
    try:
        (launch,) = launches_as_on_a_gpu(
            monkeypatch, swiglu, lambda: swiglu._silu_mul(gate, gate, pdl=True))
        lines = gpu_ptx(launch)
        assert sum("div.rn.f32" in line for line in lines) == divisions
        assert launch[2]["BLOCK"] == block
        grids = []
        monkeypatch.setattr(swiglu, "launch", lambda kernel, grid, *args, **kwargs:
                            grids.append(grid))
        swiglu._silu_mul(gate, gate, pdl=True)
        assert grids == [(1, -(-11008 // block))]
        with pytest.raises(ValueError, match="unknown silu BLOCK 100"):
            swiglu.set_block(100)
        assert swiglu.BLOCK == block
    finally:
        swiglu.set_block(1024)


@needs_triton
def test_the_soft_cap_is_torchs_tanh_and_the_combine_divides_exactly(monkeypatch):
    """The split-KV kernel with Gemma 2's cap, as on a GPU: tanh is libdevice's (no sigmoid's
    approximate division left), of the score times cap's float32 reciprocal (what torch's CUDA
    `scores / cap` multiplies by); without a cap no tanh at all. The combine divides through
    div.rn. The online softmax's exp stays Triton's (tl.exp) either way."""
    dtype = torch.bfloat16
    q, cache = torch.zeros(1, 4, 2, 64, dtype=dtype), torch.zeros(1, 4, 256, 64, dtype=dtype)
    pos = torch.arange(256)
    for cap in (0.0, 50.0, 30.0, 0.3):
        split, combine = launches_as_on_a_gpu(
            monkeypatch, decode_attention, lambda c=cap: decode_attention._split_kv_decode(
                q, cache, cache, pos, pos[:1], 0, False, 3, c, pdl=True))
        want = float(np.float32(1.0) / np.float32(cap)) if cap else 0.0
        assert split[2]["INV_SOFTCAP"] == want and split[2]["SOFTCAP"] == cap, cap
        lines = gpu_ptx(split)
        assert_exact_divisions(lines, False, f"split-KV, cap {cap}")
        assert any(LIBDEVICE_EX2 in line for line in lines) == (cap > 0), cap  # tanhf
        assert any(TL_EXP in line for line in lines), cap  # the softmax's exp
        assert_exact_divisions(gpu_ptx(combine), True, f"combine, cap {cap}")


def distinct_expert_ids(tokens: int, n_experts: int, top_k: int, generator: torch.Generator,
                        device: str) -> torch.Tensor:
    """Random expert ids [tokens, top_k], distinct within a token as a router's top-k gives
    them: the gathered kernels write a token's row once per distinct expert, so a repeated id
    would leave one of its slots unwritten."""
    scores = torch.rand(tokens, n_experts, device=device, generator=generator)
    return scores.topk(top_k, dim=-1).indices


def test_the_gpu_tests_expert_ids_are_distinct_within_a_token():
    ids = distinct_expert_ids(64, 6, 2, torch.Generator().manual_seed(0), "cpu")
    assert ids.shape == (64, 2) and 0 <= int(ids.min()) and int(ids.max()) < 6
    assert all(len(set(row)) == 2 for row in ids.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_on_cuda_the_silu_kernels_are_eagers_to_the_bit(dtype):
    """On a GPU: the activation kernel equals F.silu(gate) * up at every block of
    swiglu.BLOCKS, and the experts' gate/up kernel eager's gathered chain, to the bit (weight
    rows that each pick one column of x: products exact in any order), over gates from -90
    to 90."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.cat([torch.randn(3, 4000, device="cuda", generator=gen) * s for s in (1, 8)]
                     + [torch.linspace(-90, 90, 4000, device="cuda")[None]]).to(dtype)
    up = torch.randn(gate.shape, device="cuda", generator=gen).to(dtype)
    kept = swiglu.BLOCK
    try:
        for block in swiglu.BLOCKS:
            swiglu.set_block(block)
            assert torch.equal(swiglu.silu_mul_triton(gate, up), F.silu(gate) * up), \
                (dtype, block)
    finally:
        swiglu.set_block(kept)
    n_experts, ffn, dim = 6, 96, 512
    for tokens in (1, 3):
        x = (torch.randn(tokens, dim, device="cuda", generator=gen) * 6).to(dtype)
        pick = torch.randint(0, dim, (2, n_experts * ffn, 1), device="cuda", generator=gen)
        w1, w3 = (torch.zeros(n_experts * ffn, dim, device="cuda").scatter_(1, p, 1.0)
                  .to(dtype).view(n_experts, ffn, dim) for p in pick)
        ids = distinct_expert_ids(tokens, n_experts, 2, gen, "cuda")
        got = expert_gemv.experts_swiglu(x, ids, w1, w3)
        gate_rows = torch.einsum("nd,nkfd->nkf", x.float(), w1[ids].float()).to(dtype)
        up_rows = torch.einsum("nd,nkfd->nkf", x.float(), w3[ids].float()).to(dtype)
        assert torch.equal(got, F.silu(gate_rows) * up_rows), (dtype, tokens)


def two_key_capped_attention(device: str, cap: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, math path) outputs, float32, for queries that each see two keys, v0 = 0 and
    v1 = 1: each output is p1 / (p0 + p1) of the capped scores, so a score's error shows
    undiluted. q and k are quarter-integers (scores exact in any sum order, within +-3), so
    the two part only by the cap's function and the softmax's exp."""
    gen = torch.Generator(device=device).manual_seed(1)
    bsz, n_kv, groups, dim, slots = 16, 4, 16, 64, 64
    q = torch.randint(-2, 3, (bsz, n_kv, groups, dim), device=device, generator=gen) / 4
    k = torch.randint(-2, 3, (bsz, n_kv, slots, dim), device=device, generator=gen) / 4
    v = torch.zeros(bsz, n_kv, slots, dim, device=device)
    v[:, :, 1] = 1.0
    key_pos = torch.arange(slots, device=device)
    visible = (key_pos <= 1).expand(groups, -1)  # the step at position 1: slots 0 and 1
    from infermeter.engine.attention import decode_attention as math_attention

    want = math_attention(q, k, v, visible, softcap=cap)
    got = decode_attention.split_kv_decode(q, k, v, key_pos, key_pos[1:2], 0, False, 1, cap)
    return got, want


@pytest.mark.gpu
@torch.inference_mode()
def test_on_cuda_the_soft_cap_is_torchs_tanh():
    """On a GPU: with scores exact, the capped kernel's p1 / (p0 + p1) is the math path's
    within the softmax's exp approximation (a few float32 ulp); 2 sigmoid(2x) - 1 put errors
    of ~1e-5 into a capped score (its cancellation near 0, ex2.approx and div.full), several
    times more than this allows."""
    got, want = two_key_capped_attention("cuda")
    assert 0.01 < want.min() and want.max() < 0.99  # both keys weigh
    torch.testing.assert_close(got, want, atol=5e-7, rtol=0)
