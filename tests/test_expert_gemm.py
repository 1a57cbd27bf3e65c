"""The grouped-expert kernels (engine/kernels/expert_gemm.py, --moe-kernel triton past E / k
tokens).

Under Triton's CPU interpreter in a subprocess (tests/expert_gemm_worker.py): the kernels against
MoEFeedForward.grouped at Mixtral's and Qwen3-MoE's routings (float32, bfloat16, float16;
unchosen experts, one expert every token chose), gpt-oss's experts (biases, clamped SwiGLU) to
the bit, the compiled (fullgraph) trace, and tiny Qwen3-MoE and gpt-oss models' bucketed
compiled prefills giving the eager prefill's greedy tokens. Here: the align
step's invariants (eager and compiled), the PDL launches' PTX for sm_90, what runs where Triton
cannot, the fit check's bucket, and the CUDA comparisons (marked gpu).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from infermeter.engine.kernels.expert_gemm import align_pairs
from infermeter.engine.moe import MoEFeedForward
from infermeter.specs.presets import PRESETS
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("expert_gemm_worker.py")
MIXTRAL = PRESETS["debug"].with_updates(name="tiny-mixtral", arch="mixtral", n_experts=8,
                                        n_active_experts=2, moe_ffn_dim=48)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_grouped_expert_kernels_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


def check_aligned(ids: torch.Tensor, n_experts: int, block_m: int, sorted_ids: torch.Tensor,
                  block_expert: torch.Tensor) -> None:
    """align_pairs' promises: static sizes; every pair once, in a block of its own expert, in
    pair order within its expert; pads are the sentinel P; each expert's blocks (as many as its
    pairs need) in expert order, then sentinel blocks (expert E) of pads only."""
    flat = ids.reshape(-1).tolist()
    n_pairs = len(flat)
    n_blocks = (n_pairs + n_experts * (block_m - 1)) // block_m
    assert sorted_ids.shape == (n_blocks * block_m,) and block_expert.shape == (n_blocks,)
    assert sorted_ids.dtype == block_expert.dtype == torch.int64
    slots = sorted_ids.view(n_blocks, block_m).tolist()
    real = [p for block in slots for p in block if p != n_pairs]
    assert sorted(real) == list(range(n_pairs)), "every pair once, pads the sentinel"
    assert all(0 <= p <= n_pairs for block in slots for p in block)
    want_blocks = [e for e in range(n_experts)
                   for _ in range(-(-flat.count(e) // block_m))]  # ceil(count / block_m) each
    used = len(want_blocks)
    assert block_expert.tolist() == want_blocks + [n_experts] * (n_blocks - used)
    for block, expert in zip(slots[:used], want_blocks, strict=True):
        assert all(flat[p] == expert for p in block if p != n_pairs), (block, expert)
    assert all(p == n_pairs for block in slots[used:] for p in block), "unused blocks: pads"
    for expert in range(n_experts):  # stable: an expert's pairs in pair order
        mine = [p for block, e in zip(slots, block_expert.tolist()) for p in block
                if e == expert and p != n_pairs]
        assert mine == [p for p in range(n_pairs) if flat[p] == expert], expert


def test_align_groups_every_pair_by_expert_with_static_shapes():
    """Random routings (Mixtral's and Qwen3-MoE's E and k, token counts around a block), an
    expert no token chose, every pair on one expert, one token: the layout's invariants at
    block sizes 16 and 64; and the same tensors from a fullgraph compile (no host sync, no
    data-dependent size: one graph for every routing of a shape)."""
    gen = torch.Generator().manual_seed(41)
    cases = []
    for n_experts, top_k in ((8, 2), (16, 4), (128, 8)):
        for n_tokens in (1, n_experts // top_k + 1, 17, 70):
            ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k]
                               for _ in range(n_tokens)])
            cases.append((ids, n_experts))
    cases.append((torch.randint(1, 8, (23, 2), generator=gen), 8))  # expert 0 unchosen
    cases.append((torch.full((40, 1), 5), 8))  # all pairs to one expert
    cases.append((torch.full((9, 4), 15), 16))
    for block_m in (16, 64):
        for ids, n_experts in cases:
            check_aligned(ids, n_experts, block_m, *align_pairs(ids, n_experts, block_m))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(align_pairs, fullgraph=True, dynamic=False, backend="eager")
    routings = [torch.randint(0, 8, (23, 2), generator=gen), torch.full((23, 2), 3),
                torch.randint(4, 8, (23, 2), generator=gen)]  # spread, one expert, half unused
    for ids in routings:
        traced = compiled(ids, 8, 16)
        assert all(torch.equal(a, b) for a, b in zip(align_pairs(ids, 8, 16), traced,
                                                      strict=True))
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every routing of a shape
    torch._dynamo.reset()


def test_align_breaks_are_caught():
    """check_aligned fails on a layout that loses a pair or mixes experts in a block."""
    ids = torch.tensor([[0, 1], [1, 2], [0, 2]])
    sorted_ids, block_expert = align_pairs(ids, 4, 16)
    lost = sorted_ids.clone()
    lost[lost == 3] = 6  # pair 3 becomes a pad
    with pytest.raises(AssertionError):
        check_aligned(ids, 4, 16, lost, block_expert)
    mixed = block_expert.clone()
    mixed[0] = 1
    with pytest.raises(AssertionError):
        check_aligned(ids, 4, 16, sorted_ids, mixed)


@needs_triton
def test_pdl_launches_wait_before_reading_anything(monkeypatch):
    """Both grouped kernels launched with PDL at Qwen3-30B-A3B's shapes (64 tokens, 8 of 128
    experts each) and gpt-oss-20b's (biases, the clamped SwiGLU with libdevice's expf;
    Mixtral's widths build the same code), compiled for sm_90 (so they build for a GPU at all,
    tl.dot included): the wait comes before the release and before every global load (the pair
    ids say which rows to read)."""
    from infermeter.engine.kernels import expert_gemm
    from infermeter.engine.kernels.expert_gemm import _grouped_down, _grouped_swiglu, block_tiles
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    monkeypatch.setattr(expert_gemm, "compiled_for_gpu", lambda x: True)  # as on the GPU
    dtype = torch.bfloat16
    calls = {}
    for name, n_experts, top_k, hidden, dim in (("qwen3", 128, 8, 768, 2048),
                                                 ("gpt-oss", 32, 4, 2880, 2880)):
        n_tokens = 64
        ids = torch.zeros(n_tokens, top_k, dtype=torch.int64)
        sorted_ids, blocks = align_pairs(ids, n_experts, block_tiles(n_tokens * top_k,
                                                                     n_experts)[0])
        w13 = torch.zeros(n_experts, hidden, dim, dtype=dtype)
        w2 = torch.zeros(n_experts, dim, hidden, dtype=dtype)
        x = torch.zeros(n_tokens, dim, dtype=dtype)
        act = torch.zeros(n_tokens * top_k, hidden, dtype=dtype)
        gpt_oss = name == "gpt-oss"  # its biases [E, ffn] / [E, dim] and clamped SwiGLU
        b13 = torch.zeros(n_experts, hidden, dtype=dtype) if gpt_oss else None
        b2 = torch.zeros(n_experts, dim, dtype=dtype) if gpt_oss else None
        limit = 7.0 if gpt_oss else None
        calls[f"swiglu {name}"] = lambda x=x, s=sorted_ids, b=blocks, w=w13, k=top_k, c=b13, \
            lim=limit: _grouped_swiglu(x, s, b, w, w, k, True, c, c, lim, 1.702)
        calls[f"down {name}"] = lambda a=act, s=sorted_ids, b=blocks, w=w2, k=top_k, c=b2: \
            _grouped_down(a, s, b, w, k, True, c)
    for name, call in calls.items():
        (launch,) = pdl_launches(monkeypatch, call)
        lines, wait = pdl_ptx(launch, name)
        assert first(lines, "ld.global") > wait, name
        assert any("mma" in line for line in lines), f"{name}: no tensor-core product"


@torch.inference_mode()
def test_where_triton_cannot_run_the_torch_paths_run_and_prefill_is_exact():
    """On the CPU without the interpreter: a model asked for "triton" groups its tokens with
    the torch path (the same output as "torch"), and its Generator keeps the exact prefill (the
    torch grouped path syncs with the host)."""
    from infermeter.engine.generator import Generator
    from infermeter.engine.model import build_model
    from infermeter.engine.moe import prefills_without_sync, set_moe_kernel

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs here (its interpreter)")
    model = build_model(MIXTRAL, seed=1)
    gen = Generator(model, max_seq_len=32, bucketed_prefill=True)
    moe = model.layers[0].feed_forward
    x = torch.randn(9, MIXTRAL.dim, generator=torch.Generator().manual_seed(2))
    want = moe(x[:, None]).squeeze(1)
    set_moe_kernel(model, "triton")
    assert not moe.runs_kernels(x)
    assert torch.equal(moe(x[:, None]).squeeze(1), want)
    assert not prefills_without_sync(model) and not gen.bucketed_prefill
    dense = build_model(PRESETS["debug"], seed=1)
    assert prefills_without_sync(dense)
    assert Generator(dense, max_seq_len=32, bucketed_prefill=True).bucketed_prefill


def test_the_fit_check_sizes_an_moe_prefill_at_its_bucket_with_the_triton_experts():
    """generate's fit check: an MoE model's compiled prefill is padded to its bucket only with
    the Triton experts (the torch ones keep the exact prefill)."""
    from infermeter.generate.memory import case_memory

    spec = PRESETS["mixtral-8x7b"]

    def acts(moe_kernel):
        return case_memory(spec, 1, 1100, 4096, "bfloat16", "bfloat16", "compiled",
                           prefill="bucketed", moe_kernel=moe_kernel)["prefill activations"]

    assert acts("triton") > acts("torch")


def test_the_fit_check_counts_the_grouped_kernels_intermediates():
    """With the Triton experts a prefill of T tokens holds one layer's [T x k, moe_ffn] SwiGLU
    output and [T x k, dim] down products (Mixtral: k 2, 14,336 and 4,096 wide, bf16); the
    torch path and a forward of B x T x k <= E pairs (the gathered kernels) hold none."""
    from infermeter.engine.prefill_buckets import prefill_forwards
    from infermeter.generate.memory import case_memory

    spec = PRESETS["mixtral-8x7b"]

    def parts(prompt, moe_kernel, tp=1, prefill="bucketed"):
        return case_memory(spec, 1, prompt, 4096, "bfloat16", "bfloat16", "compiled", tp=tp,
                           prefill=prefill, moe_kernel=moe_kernel)

    tokens = max(n for _, n in prefill_forwards(1100, None, 4096))  # the padded forward
    assert tokens >= 1100
    assert parts(1100, "triton")["grouped expert activations"] == tokens * 2 * (14336 + 4096) * 2
    assert parts(1100, "triton", tp=2)["grouped expert activations"] == \
        tokens * 2 * (7168 + 4096) * 2  # each rank holds its rows of the experts' products
    assert "grouped expert activations" not in parts(1100, "torch")
    # one token unpadded: 2 pairs of 8 experts, the gathered kernels; padded to its bucket of
    # 16, 32 pairs go through the grouped ones
    assert "grouped expert activations" not in parts(1, "triton", prefill="exact")
    assert parts(1, "triton")["grouped expert activations"] == 16 * 2 * (14336 + 4096) * 2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b"])
def test_grouped_kernels_on_cuda_match_the_torch_grouped_path(name):
    """On a GPU, one layer's experts of the real model at its shapes (bf16, random weights;
    gpt-oss's with biases and its clamped SwiGLU), a prefill's 1 x 300 and 4 x 64 tokens,
    plain and PDL launches: the Triton path within bf16 rounding of the torch grouped path
    (both against the output's scale)."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import launch_ways

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = PRESETS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    moe = MoEFeedForward(spec.dim, spec.moe_ffn_dim, spec.n_experts, spec.n_active_experts,
                         True, bias=spec.moe_bias, swiglu_alpha=spec.swiglu_alpha,
                         swiglu_limit=spec.swiglu_limit).to("cuda", torch.bfloat16)
    for param in moe.parameters():
        param.data = (torch.randn(param.shape, device="cuda", generator=gen)
                      / param.shape[-1] ** 0.5).to(torch.bfloat16)
    with torch.inference_mode():
        for n_tokens in (300, 256):
            x = torch.randn(n_tokens, spec.dim, device="cuda", generator=gen).to(torch.bfloat16)
            weights, ids = moe.route(x)
            want = moe.grouped(x, weights, ids).float()
            moe.moe_kernel = "triton"
            assert moe.runs_kernels(x)
            for pdl_on in launch_ways(x.device):
                with pdl.launching(pdl_on):
                    got = moe(x[:, None]).squeeze(1).float()
                err = (got - want).abs().max().item()
                assert err <= 4 * 2 ** -8 * want.abs().max().item(), (n_tokens, pdl_on, err)
            moe.moe_kernel = "torch"


@pytest.mark.gpu
def test_inductor_compiles_the_grouped_ops_on_cuda():
    """On a GPU, a tiny Mixtral MoE block (8 experts) with the Triton choice compiled by inductor
    (fullgraph) at 9 and 40 tokens (past E / k: the grouped kernels): the eager torch block's
    output within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from infermeter.engine.model import build_model

    moe = build_model(MIXTRAL, device="cuda", dtype=torch.bfloat16, seed=0).layers[0].feed_forward
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.inference_mode():
        for n_tokens in (9, 40):
            x = torch.randn(n_tokens, 1, MIXTRAL.dim, device="cuda",
                            generator=gen).to(torch.bfloat16)
            moe.moe_kernel = "torch"
            want = moe(x).float()
            moe.moe_kernel = "triton"
            got = torch.compile(moe, fullgraph=True, dynamic=False)(x).float()
            assert (got - want).abs().max().item() <= 4 * 2 ** -8 * want.abs().max().item()
            torch._dynamo.reset()
