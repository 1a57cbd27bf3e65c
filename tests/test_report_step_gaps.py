"""The report's decode-step table (report/step_gaps.py) from synthetic generate Results whose
breakdown carries step gaps (measure/gaps.py run on known kernels): the step split into
kernels and gaps, the kernels per step and per layer, the bytes-bound time where the trace holds
it, a column only where a Result carries gaps, no table without any."""

import pytest

from infermeter.measure.gaps import step_gaps
from infermeter.measure.result import Result, append_jsonl
from infermeter.report.build import build_report, render

# One step, us: layer 0 kernels 0-10, 12-20 (gap 2), layer 1 kernels 25-40, 40-50 (a gap of 5
# between the layers), then the head 54-60 (gap 4). span 60, busy 49, 3 gaps, 5 kernels.
STEP = [(0, 10, "l0_a", 0), (12, 20, "l0_b", 0), (25, 40, "l1_a", 1), (40, 50, "l1_b", 1),
        (54, 60, "head", None)]
SLOW = [(0, 10, "l0_a", 0), (12, 20, "l0_b", 0), (25, 40, "l1_a", 1), (40, 50, "l1_b", 1),
        (64, 70, "head", None)]  # the same step with a 14 us gap before the head


def _items(step):
    return [{"start": a, "end": b, "name": n, "stream": 7, "layer": layer}
            for a, b, n, layer in step]


def _gaps(meta):
    # steps 0 and 2 as STEP, step 1 slower; step 0 is shown (the median step's figures)
    return step_gaps([_items(STEP), _items(SLOW), _items(STEP)], 0, meta)


def _generate(device, gaps, mode="compiled"):
    breakdown = {"step_ms": 0.06, "categories": [{"name": "matmul", "time_ms": 0.049}],
                 "step_gaps": gaps}
    return Result("generate", {"name": "m"}, {"batch_size": 1, "mode": mode, "context": 512},
                  {"device_name": device}, {"ttft_ms": 5.0, "decode_tok_per_s": 100.0,
                                            "breakdown": breakdown}, {}, [])


def _report(tmp_path, *results):
    path = tmp_path / f"gen-{len(list(tmp_path.iterdir()))}.jsonl"  # a new file each call
    append_jsonl(path, list(results))
    return build_report([str(path)])


def _table(report):
    found = [t for t in report.tables if t.key == "step-gaps"]
    return found[0] if found else None


def test_the_table_splits_the_step_into_kernels_and_gaps(tmp_path):
    # 2 MB a step at 1,000 GB/s: 0.002 ms bytes-bound, the 0.06 ms step 30x it
    report = _report(tmp_path, _generate("gpu-a", _gaps({"bytes_per_step": 2e6,
                                                         "hbm_gbps": 1000.0})),
                     _generate("gpu-b", None, mode="eager"))  # a CPU-style trace: no gaps
    table = _table(report)
    assert table.header == ["Device", "gpu-a · m"]  # gpu-b has no step gaps: no column
    rows = {row[0]: row[1] for row in table.rows}
    assert rows["Traced run"] == "compiled, batch 1, context 512"
    assert rows["Step (kernels + gaps)"] == "0.060 ms = 0.049 ms + 0.011 ms"
    assert rows["Gaps"] == "18.3% of the step (3 gaps, mean 3.7 µs)"
    assert rows["Kernels per step"] == "5 on 1 stream(s); 2.0 a layer over 2 layers"
    # no kernel starts before the one ahead ends: 0 of 4, starting 2, 5, 0 and 4 us after it
    # (the median of 0, 2, 4, 5: 3)
    assert rows["Started early (PDL)"] == "0 of 4 kernels; median start +3.00 µs"
    assert rows["Bytes-bound time"] == "0.002 ms (1.9 MiB at 1,000.0 GB/s); step/bound 30.00"
    assert rows["Largest gap"] == "5.0 µs, after l0_b"
    assert rows["Median of the traced steps"] == \
        "0.060 ms = 0.049 ms + 0.011 ms, 5 kernels (3 steps)"
    assert any(n.startswith("gpu-a · m: decode-step gaps from ") for n in report.notes)
    markdown = render(report, "markdown")
    assert "## Decode step: kernels and gaps (--trace)" in markdown


def test_without_bandwidth_the_bound_is_unknown_and_without_gaps_no_table(tmp_path):
    table = _table(_report(tmp_path, _generate("gpu-a", _gaps({}))))
    assert {row[0]: row[1] for row in table.rows}["Bytes-bound time"] == "-"
    assert _table(_report(tmp_path, _generate("gpu-b", None))) is None


@pytest.mark.parametrize("fmt", ["csv", "terminal"])
def test_every_format_shows_it(tmp_path, fmt):
    report = _report(tmp_path, _generate("gpu-a", _gaps({})))
    assert "2.0 a layer over 2 layers" in render(report, fmt, width=200)


def test_early_starts_are_counted_and_an_older_result_shows_none(tmp_path):
    """PDL's overlap: l0_b starts 3 us before l0_a ends (starts -3, 5, 0, 4: median 2); a
    Result traced before the starts were counted (no such fields) shows '-'."""
    overlapping = [(0, 10, "l0_a", 0), (7, 20, "l0_b", 0), (25, 40, "l1_a", 1),
                   (40, 50, "l1_b", 1), (54, 60, "head", None)]
    gaps = step_gaps([_items(overlapping)], 0, {})
    rows = {row[0]: row[1] for row in _table(_report(tmp_path, _generate("gpu-a", gaps))).rows}
    assert rows["Started early (PDL)"] == "1 of 4 kernels; median start +2.00 µs"
    older = {k: v for k, v in gaps.items()
             if k not in ("early_starts", "starts_counted", "median_start_us")}
    rows = {row[0]: row[1] for row in _table(_report(tmp_path, _generate("gpu-b", older))).rows}
    assert rows["Started early (PDL)"] == "-"


def test_a_column_shows_its_traced_result_that_has_gaps(tmp_path):
    """A compiled Result traced without gaps (an older one) does not hide an eager one with."""
    report = _report(tmp_path, _generate("gpu-c", None), _generate("gpu-c", _gaps({}), "eager"))
    rows = {row[0]: row[1] for row in _table(report).rows}
    assert rows["Traced run"] == "eager, batch 1, context 512"


def test_layers_found_by_the_kernel_pattern_say_so(tmp_path):
    """A compiled step's layers (no ranges: gaps.py found them by its kernel pattern)."""
    steps = [[{**item, "layer": None} for item in _items(STEP)]] * 2
    names = ["nqr", "attn", "nqr", "attn", "head"]
    for step in steps:
        for item, name in zip(step, names):
            item["name"] = name
    gaps = step_gaps(steps, 0, {}, n_layers=2)
    assert gaps["layers_from"] == "kernel pattern"
    rows = {row[0]: row[1] for row in _table(_report(tmp_path, _generate("gpu-a", gaps))).rows}
    assert rows["Kernels per step"] == \
        "5 on 1 stream(s); 2.0 a layer over 2 layers (layers found by the kernel pattern)"
