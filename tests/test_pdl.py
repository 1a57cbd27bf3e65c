"""engine/kernels/pdl.py: programmatic dependent launch of the decode step's Triton kernels.

The GPU test (test_generate.py, gpu) checks that PDL changes no token; here, with no GPU: every
PDL launch the ops make compiles for an H100 with the launch attribute, and its machine code
keeps the one rule PDL's correctness rests on (pdl.py): nothing the previous kernel wrote is
read before `griddepcontrol.wait`, and the next kernel is let go only after it. The GEMV alone
reads something (its weights) before the wait.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from infermeter.engine.kernels import pdl
from tests.sm90_build import recorded_launches, sm90_binary
from tests.test_peer_all_reduce import needs_triton


def pdl_launches(monkeypatch, call) -> list:
    """(kernel, args, kwargs) of every launch call() makes on the PDL path, as if on a GPU
    (pdl.on_gpu patched true), recorded instead of run."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    monkeypatch.setattr(pdl, "on_gpu", lambda tensor: True)
    monkeypatch.setattr(pdl, "direct", Recorder)
    call()
    return launches


def sm90_lines(kernel, args, kwargs) -> tuple[object, list[str]]:
    """Build one recorded launch for sm_90 as Triton would at that launch: (metadata, PTX
    lines)."""
    binary = sm90_binary(kernel, args, kwargs)
    return binary.metadata, binary.asm["ptx"].splitlines()


def first(lines: list[str], pattern: str, after: int = -1) -> int:
    """Index of the first line after `after` containing pattern (len(lines) if none)."""
    return next((i for i, line in enumerate(lines) if i > after and pattern in line), len(lines))


def pdl_ptx(launch, name: str) -> tuple[list[str], int]:
    """One recorded PDL launch (kernel, args, kwargs) built for sm_90: its PTX lines and the index
    of its wait, checked to carry the launch attribute and to wait before it releases the next
    kernel (pdl.py's rule); what it may read before the wait is the caller's to check."""
    kernel, args, kwargs = launch
    assert kwargs["PDL"] is True and kwargs["launch_pdl"] is True, name
    metadata, lines = sm90_lines(kernel, args, kwargs)
    assert metadata.launch_pdl, name
    wait = first(lines, "griddepcontrol.wait")
    assert wait < first(lines, "griddepcontrol.launch_dependents") < len(lines), \
        f"{name}: release before wait, or none"
    return lines, wait


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pdl_launches_wait_before_reading_and_release_after(monkeypatch, dtype):
    from infermeter.engine.kernels.decode_attention import _split_kv_decode
    from infermeter.engine.kernels.gemv import _gemv
    from infermeter.engine.kernels.rope_rows import _rope_rows
    from infermeter.engine.kernels.swiglu import _silu_mul

    q = torch.zeros(1, 4, 2, 64, dtype=dtype)
    cache = torch.zeros(1, 4, 256, 64, dtype=dtype)
    pos = torch.arange(256)
    gate = torch.zeros(1, 1, 1000, dtype=dtype)
    calls = {"attention": lambda: _split_kv_decode(q, cache, cache, pos, pos[:1], 0, False, 3, 0.0,
                                                    pdl=True),
             "activation": lambda: _silu_mul(gate, gate, pdl=True),
             # the position is the held step's argmax's output, the kernel just before
             "rope rows": lambda: _rope_rows(pos[:, None].float(), pos[:, None].float(), pos[:1],
                                             pdl=True)}
    for n_cols in (2560, 4096, 5120, 11008):  # every tiling rule of tiles_for
        row, weight = torch.zeros(1, n_cols, dtype=dtype), torch.zeros(40, n_cols, dtype=dtype)
        calls[f"gemv {n_cols}"] = lambda r=row, w=weight: _gemv(r, w, pdl=True)
    for name, call in calls.items():
        launches = pdl_launches(monkeypatch, call)
        assert len(launches) == (2 if name == "attention" else 1)  # split-KV + combine
        for launch in launches:
            lines, wait = pdl_ptx(launch, name)
            early_loads = [line for line in lines[:wait] if "ld.global" in line]
            if name.startswith("gemv"):  # the first weight tile, and nothing else
                assert early_loads and all("evict_first" in line for line in early_loads), name
                assert first(lines, "ld.global", wait) < len(lines)  # x, after the wait
            else:
                assert early_loads == [], f"{name} reads before the wait"


@needs_triton
def test_peer_all_reduce_kernels_wait_first_under_pdl(monkeypatch):
    """The tensor-parallel all-reduce kernels, launched while pdl.enabled(): wait,
    then let the next kernel (a GEMV, which streams weights meanwhile) go, before any signal,
    store or read."""
    from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce, buffer_bytes

    buffers = [torch.zeros(buffer_bytes(2, 2), dtype=torch.uint8)] * 2
    peer = PeerAllReduce(0, buffers, 2)
    x = torch.zeros(1, 1, 5120, dtype=torch.bfloat16)
    weight = torch.ones(5120, dtype=torch.bfloat16)
    with pdl.launching(True):
        launches = pdl_launches(monkeypatch, lambda: (
            peer(x, 0), peer.add_norm(x, x, weight, 1e-5, 1)))
    assert [kernel.fn.__name__ for kernel, _, _ in launches] == [
        "_peer_all_reduce_kernel", "_peer_add_norm_kernel"]
    for kernel, args, kwargs in launches:
        _, lines = sm90_lines(kernel, args, kwargs)
        wait = first(lines, "griddepcontrol.wait")
        assert wait < first(lines, "griddepcontrol.launch_dependents") < len(lines)
        assert first(lines, "ld.global") > wait and first(lines, "atom.") > wait
        assert first(lines, "red.") > wait and first(lines, "st.global") > wait


def test_without_pdl_the_ops_launch_as_before(monkeypatch):
    """pdl=False (the default): through wrap_triton, with the PDL constexpr off and no launch
    attribute, whatever the device."""
    from infermeter.engine.kernels.gemv import _gemv

    monkeypatch.setattr(pdl, "on_gpu", lambda tensor: True)
    launches = recorded_launches(monkeypatch, lambda: _gemv(
        torch.zeros(1, 64), torch.zeros(8, 64), pdl=False))
    assert [(kw["PDL"], "launch_pdl" in kw) for _, _, kw in launches] == [(False, False)]


@pytest.mark.parametrize("way", ["both", "combine", "none"])
@pytest.mark.parametrize("block", ["auto", "on", "off"])
def test_the_attention_takes_the_pdl_way_it_is_told(monkeypatch, way, block):
    """decode_attention.ATTENTION_PDL and EARLY_BLOCK (A/B switches, benchmarks/
    step_kernels_ab.py --attention-pdl, --early-block) with PDL on for the step: "both" (the
    default) and "combine" take the PDL op, the split kernel early in the first only, with
    SPLIT_STAGES and the block's load passed on: "auto" (the default) before the wait in the
    fused step and after it in the split one, "on" and "off" in both, and the combine's early
    release (pdl.EARLY_RELEASE) and the split kernel's (pdl.ATTENTION_RELEASE) in the fused
    step only; "none" the plain op.
    With PDL off, the plain op whatever the way; a way there is not is an error."""
    from infermeter.engine.kernels import decode_attention

    assert (decode_attention.ATTENTION_PDL, decode_attention.SPLIT_STAGES,
            decode_attention.EARLY_BLOCK) == ("both", 0, "auto")
    calls = []
    for name in ("split_kv_decode", "split_kv_decode_pdl"):
        monkeypatch.setattr(decode_attention, name,
                            lambda *args, name=name: calls.append((name, args[10:])))
    monkeypatch.setattr(decode_attention, "ATTENTION_PDL", way)
    monkeypatch.setattr(decode_attention, "SPLIT_STAGES", 2)
    monkeypatch.setattr(decode_attention, "EARLY_BLOCK", block)
    args = (None,) * 5 + (0, False, 1)
    for fused, release, split_release in itertools.product(
            (True, False), pdl.EARLY_RELEASE_WAYS, pdl.ATTENTION_RELEASE_WAYS):
        monkeypatch.setattr(pdl, "EARLY_RELEASE", release)
        monkeypatch.setattr(pdl, "ATTENTION_RELEASE", split_release)
        calls.clear()
        with pdl.launching(True):
            decode_attention.decode_attention_kernel(*args, fused_step=fused)
        decode_attention.decode_attention_kernel(*args, fused_step=fused)
        early_block = {"auto": fused, "on": True, "off": False}[block]
        assert decode_attention.early_block_for(fused) is early_block
        released = fused and release == "on"  # the combine's early release: the fused step's
        # the split kernel's, likewise ("auto" outside a generator's step: after the wait)
        split_first = fused and split_release in ("before", "split")
        wanted = {"both": ("split_kv_decode_pdl", (True, 2, early_block, released, split_first)),
                  "combine": ("split_kv_decode_pdl",
                              (False, 2, early_block, released, split_first)),
                  "none": ("split_kv_decode", ())}[way]
        assert calls == [wanted, ("split_kv_decode", ())], (block, fused, release,
                                                           split_release)
    for name, value in (("ATTENTION_PDL", "first"), ("EARLY_BLOCK", "late")):
        monkeypatch.setattr(decode_attention, name, value)
        with pytest.raises(ValueError, match=name):
            decode_attention.decode_attention_kernel(*args)
        monkeypatch.setattr(decode_attention, name, {"ATTENTION_PDL": way,
                                                     "EARLY_BLOCK": block}[name])


@needs_triton
def test_a_plainly_launched_split_kernel_releases_the_combine_and_takes_its_stages(monkeypatch):
    """ATTENTION_PDL "combine": the split kernel is launched without the PDL attribute (so it
    starts once the kernel before has ended) and compiled with no wait but with the release,
    which lets the combine, launched with PDL, start early; the combine waits before reading
    the splits. SPLIT_STAGES reaches the split kernel's build where a program loops over
    blocks: one stage holds no pipeline buffers, so it takes less shared memory than Triton's
    default."""
    from infermeter.engine.kernels.decode_attention import _split_kv_decode

    q = torch.zeros(1, 3, 3, 64, dtype=torch.float16)  # SmolLM2-135M's heads
    cache = torch.zeros(1, 3, 512, 64, dtype=torch.float16)
    pos = torch.arange(512)
    split, combine = pdl_launches(monkeypatch, lambda: _split_kv_decode(
        q, cache, cache, pos, pos[:1], 0, False, 8, 0.0, pdl=True, early_split=False))
    kernel, args, kwargs = split
    assert (kwargs["PDL"], kwargs["RELEASE"], "launch_pdl" in kwargs) == (False, True, False)
    metadata, lines = sm90_lines(kernel, args, kwargs)
    assert not metadata.launch_pdl
    assert first(lines, "griddepcontrol.wait") == len(lines)  # nothing to wait for
    assert first(lines, "griddepcontrol.launch_dependents") < len(lines)
    lines, wait = pdl_ptx(combine, "combine")
    assert [line for line in lines[:wait] if "ld.global" in line] == []
    shared = {}
    for stages in (0, 1):  # 3 splits of 512 slots: blocks to loop over (8 would be one each)
        (kernel, args, kwargs), _ = pdl_launches(monkeypatch, lambda s=stages: _split_kv_decode(
            q, cache, cache, pos, pos[:1], 0, False, 3, 0.0, pdl=True, split_stages=s))
        assert kwargs["ONE_BLOCK"] is False
        assert kwargs.get("num_stages", 0) == stages
        shared[stages] = sm90_lines(kernel, args, kwargs)[0].shared
    assert shared[1] < shared[0], shared


@needs_triton
def test_a_one_block_split_kernel_loads_its_block_before_the_wait(monkeypatch):
    """A program with one cache block (chunk <= BLOCK_N: 512 slots in 8 splits, a batch-1
    step's usual case) loads the position and its block's keys, values and slot positions
    before the PDL wait, and q and the step's own slot (the kernel before wrote them) after
    it; it has no loop, so no pipeline's shared memory. More slots a program, or the block
    asked late (early_block off, EARLY_BLOCK): the loop, every load after the wait."""
    from infermeter.engine.kernels.decode_attention import _split_kv_decode

    q = torch.zeros(1, 3, 3, 64, dtype=torch.float16)
    cache = torch.zeros(1, 3, 512, 64, dtype=torch.float16)
    pos = torch.arange(512)
    loads, shared = {}, {}
    for splits in (8, 3):
        (kernel, args, kwargs), _ = pdl_launches(monkeypatch, lambda n=splits: _split_kv_decode(
            q, cache, cache, pos, pos[:1], 0, False, n, 0.0, pdl=True))
        assert kwargs["ONE_BLOCK"] is (splits == 8)
        lines, wait = pdl_ptx((kernel, args, kwargs), f"split, {splits} splits")
        loads[splits] = ([line for line in lines[:wait] if "ld.global" in line],
                         [line for line in lines[wait:] if "ld.global" in line])
        shared[splits] = sm90_lines(kernel, args, kwargs)[0].shared
    (kernel, args, kwargs), _ = pdl_launches(monkeypatch, lambda: _split_kv_decode(
        q, cache, cache, pos, pos[:1], 0, False, 8, 0.0, pdl=True, early_block=False))
    assert kwargs["ONE_BLOCK"] is False  # EARLY_BLOCK "off": the loop's one block, after it
    lines, wait = pdl_ptx((kernel, args, kwargs), "split, 8 splits, the block late")
    assert [line for line in lines[:wait] if "ld.global" in line] == []
    before, after = loads[8]
    # the position (b64), the keys' and values' block (16-byte vectors), the slots' positions
    assert any(".b64" in line and ".v" not in line for line in before)
    assert sum(".v4" in line for line in before) >= 2
    # q, and the step's own slot's key, value and position again
    assert sum(".v" in line for line in after) >= 1 and len(after) >= 4
    assert loads[3][0] == []
    assert shared[8] < shared[3], shared


@needs_triton
def test_an_unsplit_kernel_loads_the_whole_cache_before_the_wait(monkeypatch, tmp_path):
    """n_splits 0, the unsplit kernel, at SmolLM2-135M's, Qwen2.5-0.5B's and Llama-3.2-1B's
    heads over a 512-slot cache, built for sm_90 with PDL: one launch (no combine), the keys and
    values loaded before the wait and q after it, as a one-block split; its whole block held in
    registers at UNSPLIT_WARPS warps, at most 16 bytes a thread spilled to local memory."""
    from infermeter.engine.kernels.decode_attention import UNSPLIT_WARPS, _split_kv_decode
    from tests.sm90_build import sm90_registers

    for kv_heads, groups in ((3, 3), (2, 7), (8, 4)):
        q = torch.zeros(1, kv_heads, groups, 64, dtype=torch.bfloat16)
        cache = torch.zeros(1, kv_heads, 512, 64, dtype=torch.bfloat16)
        pos = torch.arange(512)
        launches = pdl_launches(monkeypatch, lambda q=q, c=cache, p=pos: _split_kv_decode(
            q, c, c, p, p[:1], 0, False, 0, 0.0, pdl=True))
        assert len(launches) == 1, f"{groups} groups: {len(launches)} launches"
        kernel, args, kwargs = launches[0]
        assert (kwargs["BLOCK"], kwargs["num_warps"]) == (512, UNSPLIT_WARPS)
        lines, wait = pdl_ptx(launches[0], f"unsplit, {groups} groups")
        before = [line for line in lines[:wait] if "ld.global" in line]
        after = [line for line in lines[wait:] if "ld.global" in line]
        assert sum(".v4" in line for line in before) >= 2, before  # keys and values
        assert sum(".v" in line for line in after) >= 1, after  # q (and the step's own slot)
        folder = tmp_path / str(groups)
        folder.mkdir()
        registers, spilled = sm90_registers("\n".join(lines), folder)
        # 8 warps: 255 registers a thread and 16 bytes spilled (16 warps spilled 216 bytes at
        # their 128 registers): keys and values are 128 of them
        assert spilled <= 16 and registers * 32 * UNSPLIT_WARPS <= 65536, (groups, registers,
                                                                         spilled)


def test_launching_sets_and_restores():
    assert not pdl.enabled()
    with pdl.launching(True):
        assert pdl.enabled()
        with pdl.launching(False):
            assert not pdl.enabled()
        assert pdl.enabled()
    assert not pdl.enabled()
    with pytest.raises(RuntimeError), pdl.launching(True):
        raise RuntimeError
    assert not pdl.enabled()


def launch_ways(device: torch.device) -> tuple[bool, ...]:
    """The PDL settings a gpu test runs a kernel under: both where PDL can launch on `device`,
    else without it only."""
    return (False, True) if pdl.supported(device) else (False,)


def test_inductor_options_and_support_on_this_machine():
    assert pdl.inductor_options(True) == {"triton.enable_pdl": True}
    assert pdl.inductor_options(False) == {}
    assert not pdl.supported(torch.device("cpu"))  # no GPU: never


def test_resolve_takes_the_flag_else_where_it_runs(monkeypatch):
    """--pdl / --no-pdl as given; by default on exactly where it can run with inductor."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert pdl.resolve(True, cpu, None) and not pdl.resolve(False, gpu, None)
    assert not pdl.resolve(None, cpu, None)  # nowhere to run
    monkeypatch.setattr(pdl, "supported", lambda device: device.type == "cuda")
    assert pdl.resolve(None, gpu, None) and pdl.resolve(None, gpu, "inductor")
    assert not pdl.resolve(None, gpu, "cudagraphs")  # no inductor kernels to launch so


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pdl_gemv_on_cuda_matches_the_float32_product(dtype):
    """The PDL launch of the GEMV on a GPU (griddepcontrol compiled in, FIRST_K columns loaded
    before the wait) for Llama-2-13B's shapes at tp 1 and 2: each within rounding of the
    float32 product, as the plain launch is."""
    from infermeter.engine.kernels.gemv import _gemv

    if not torch.cuda.is_available() or not pdl.supported(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a torch with inductor PDL")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n_rows, n_cols in ((7680, 5120), (5120, 6912), (5120, 13824), (5120, 2560)):
        x = torch.randn(1, n_cols, device="cuda", generator=gen).to(dtype)
        w = torch.randn(n_rows, n_cols, device="cuda", generator=gen).to(dtype)
        want = x.float() @ w.float().T
        scale = (x.float().abs() @ w.float().abs().T).max().item()
        for pdl_on in (False, True):
            got = _gemv(x, w, pdl=pdl_on).float()
            err = (got - want).abs().max().item()
            assert err <= 2 ** -7 * scale, (n_cols, pdl_on, err)  # one 16-bit rounding


@pytest.mark.gpu
def test_on_cuda_ropes_rows_are_the_tables():
    """kernels/rope_rows.py on a GPU, plainly and with PDL where it runs: the tables' rows at
    the positions, to the bit (int64 and int32 positions, the first and last rows)."""
    from infermeter.engine.kernels.rope_rows import _rope_rows

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cos_table = torch.randn(512, 32, device="cuda", generator=gen)
    sin_table = torch.randn(512, 32, device="cuda", generator=gen)
    for pdl_on in launch_ways(cos_table.device):
        for positions in ([0], [511], [80, 3, 511]):
            for index_dtype in (torch.int64, torch.int32):
                at = torch.tensor(positions, device="cuda", dtype=index_dtype)
                cos, sin = _rope_rows(cos_table, sin_table, at, pdl=pdl_on)
                assert torch.equal(cos, cos_table[at.long()]), (pdl_on, positions)
                assert torch.equal(sin, sin_table[at.long()]), (pdl_on, positions)


@pytest.mark.gpu
@pytest.mark.parametrize("way, stages", [("combine", 0), ("both", 1)])
def test_on_cuda_the_attentions_other_launches_give_the_eager_tokens(monkeypatch, way, stages):
    """The fused step in our recorded CUDA graph with the split kernel launched plainly
    (ATTENTION_PDL "combine") or with one pipeline stage (SPLIT_STAGES 1): eager's greedy
    tokens, PDL on where it runs."""
    from infermeter.engine.generator import Generator
    from infermeter.engine.kernels import decode_attention
    from infermeter.engine.model import set_step_kernels
    from tests.test_generate import (
        PROMPTS,
        SPEC,
        assert_compiled_gives_eager_tokens,
        peaked_cuda_model,
    )

    monkeypatch.setattr(decode_attention, "ATTENTION_PDL", way)
    monkeypatch.setattr(decode_attention, "SPLIT_STAGES", stages)
    model = peaked_cuda_model(SPEC, torch.float16)
    gen = Generator(model, max_seq_len=64, step_graphs="recorded")
    set_step_kernels(model, "fused")
    assert_compiled_gives_eager_tokens(gen, PROMPTS[:1])


@pytest.mark.parametrize("way, stages, block, kinds", [
    ("both", 0, "auto", "fused"), ("both", 0, "auto", "split"), ("combine", 1, "auto", "fused"),
    ("none", 1, "auto", "split"), ("both", 0, "on", "split"), ("both", 0, "off", "fused"),
    ("both", 0, "on", "fused")])
def test_the_result_records_the_attentions_launch_and_the_report_sets_others_aside(
        monkeypatch, way, stages, block, kinds):
    """config.attention_pdl, config.split_stages, config.early_block and
    config.early_block_way: what the compiled step's split-KV attention ran under PDL (the
    last three only where a kernel launched with it; the block by the step's kernels under
    "auto": before the wait in the fused step, after it in the split one), None where it ran no
    such kernel under PDL; the report takes a Result of any way but the default as a
    comparison, never the column's representative, and one from before the fields as default
    (before the way, a block loaded late was the A/B's)."""
    from infermeter.engine.kernels import decode_attention
    from infermeter.report.select import off_default_kernels
    from infermeter.specs.presets import PRESETS
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import batch_one_runner

    monkeypatch.setattr(decode_attention, "ATTENTION_PDL", way)
    monkeypatch.setattr(decode_attention, "SPLIT_STAGES", stages)
    monkeypatch.setattr(decode_attention, "EARLY_BLOCK", block)
    runner = batch_one_runner(monkeypatch, PRESETS["debug"], kinds)
    monkeypatch.setattr(runner.generator, "decode_attention_used", lambda *args: "triton")
    described = {}
    for pdl_on in (True, False):
        runner.generator.pdl = pdl_on
        config = runner.describe()
        assert config["step_kernels"] == kinds
        described[pdl_on] = (config["attention_pdl"], config["split_stages"],
                             config["early_block"], config["early_block_way"])
    launched = way != "none"
    early = {"auto": kinds == "fused", "on": True, "off": False}[block]
    assert described == {True: (way, stages if launched else None,
                                early if launched else None, block if launched else None),
                         False: (None, None, None, None)}
    _, split_stages, early_block, early_block_way = described[True]
    record = seed_record(1, attention_pdl=way, split_stages=split_stages,
                         early_block=early_block, early_block_way=early_block_way)
    off = way != "both" or stages != 0 or block != "auto"
    assert off_default_kernels(record) == off
    # before the way was recorded: "on" was the default, a block loaded late the A/B's
    older = seed_record(3, attention_pdl=way, split_stages=split_stages,
                        early_block=early_block)
    assert off_default_kernels(older) == (way != "both" or stages != 0 or early_block is False)
    assert not off_default_kernels(seed_record(2))  # before the fields: the default
