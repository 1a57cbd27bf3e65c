"""engine/sampling.argmax_rows: torch.argmax over a row, in parts where ARGMAX_PARTS > 1 (the
default, 64: inductor reduces a row of logits in one program). Every way gives torch's index:
ties (the first), NaN (the first), -inf rows, a vocabulary not a multiple of the parts, a row
whose maximum sits in the padding's part; and greedy and sampled draws take it. Compiled: the
gpu test (inductor's CUDA max-with-index)."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine import sampling
from infermeter.engine.sampling import argmax_rows, sample


def rows_to_check() -> torch.Tensor:
    """[9, 1000] float32: random rows, and rows with ties across and within parts, NaNs,
    all -inf, the maximum at the last index and at index 0."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 1000, generator=gen)
    x[1, [10, 500, 990]] = 7.0  # a tie in three parts: the first
    x[2, [3, 4]] = 7.0  # a tie in one part
    x[3, [600, 20]] = float("nan")  # NaN is the largest: the first NaN
    x[4] = float("-inf")
    x[5, 999] = 9.0  # the last index, in the part the padding fills
    x[6, 0] = 9.0
    x[7, :] = 1.0  # every value equal
    x[8, [998, 999]] = float("inf")
    return x


@pytest.mark.parametrize("parts", [0, 1, 2, 7, 64, 1000, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_way_gives_torchs_index(monkeypatch, parts, dtype):
    monkeypatch.setattr(sampling, "ARGMAX_PARTS", parts)
    x = rows_to_check().to(dtype)
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, torch.argmax(x, dim=-1)), got


def test_greedy_and_sampled_draws_take_the_parts(monkeypatch):
    """sample(): the same tokens with the parts as without, greedy and sampled (its race is an
    argmax too), and the parts' path is the one that ran."""
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(4))
    seed, pos = torch.tensor([11]), torch.tensor([7])
    monkeypatch.setattr(sampling, "ARGMAX_PARTS", 0)  # torch's argmax
    want = {greedy: sample(x, greedy=greedy, temperature=0.8, top_p=0.9, seed=seed, pos=pos)
            for greedy in (True, False)}
    calls = []
    real_max = torch.Tensor.max
    monkeypatch.setattr(sampling, "ARGMAX_PARTS", 16)
    monkeypatch.setattr(torch.Tensor, "max", lambda self, *a, **k: calls.append(a or k)
                        or real_max(self, *a, **k))
    for greedy in (True, False):
        got = sample(x, greedy=greedy, temperature=0.8, top_p=0.9, seed=seed, pos=pos)
        assert torch.equal(got, want[greedy]), greedy
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_the_compiled_parts_give_torchs_index(monkeypatch, dtype):
    """inductor's CUDA max-with-index breaks ties and meets NaN as torch's argmax does, over a
    vocabulary's width (151,936: Qwen2.5's) too."""
    monkeypatch.setattr(sampling, "ARGMAX_PARTS", 64)
    x = rows_to_check().to(dtype).cuda()
    wide = torch.randn(4, 151936, device="cuda", dtype=dtype)
    wide[1, [5, 151935]] = 50.0
    compiled = torch.compile(argmax_rows, fullgraph=True, dynamic=False)
    for rows in (x, wide):
        assert torch.equal(compiled(rows), torch.argmax(rows, dim=-1))


@pytest.mark.parametrize("parts", [0, 16, 64])
def test_the_result_records_the_parts_and_the_report_sets_them_aside(monkeypatch, parts):
    """The Result records the parts; the report sets aside only a count neither default's
    (0 until 2026-12-06, 64 since), and takes a Result from before the field."""
    from infermeter.report.select import off_default_kernels
    from infermeter.specs.presets import PRESETS
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import batch_one_runner

    monkeypatch.setattr(sampling, "ARGMAX_PARTS", parts)
    assert batch_one_runner(monkeypatch, PRESETS["debug"]).describe()["argmax_parts"] == parts
    assert off_default_kernels(seed_record(1, argmax_parts=parts)) == (parts == 16)
    assert not off_default_kernels(seed_record(2))  # before the field: one reduction


def test_the_report_takes_the_default_parts_over_one_reduction_timed_with_them():
    """One A/B process times both ways with one timestamp: the column's figure is the run of
    today's default (64 parts), wherever it stands in the file; a one-reduction run (the
    default before 2026-12-06, or a Result from before the field) comes before a count
    neither default's."""
    from infermeter.report.select import Column, ColumnKey, pick_generate
    from tests.report_records import seed_record

    torch_way, parts, unrecorded = (seed_record(1, argmax_parts=0), seed_record(2, argmax_parts=64),
                                    seed_record(3))
    key = ColumnKey("gpu", "m", 1)
    assert pick_generate(Column(key, generates=[torch_way, parts])) is parts
    assert pick_generate(Column(key, generates=[parts, unrecorded])) is parts
    off = seed_record(4, argmax_parts=16)  # neither default's: an A/B's comparison
    assert pick_generate(Column(key, generates=[off, unrecorded])) is unrecorded
