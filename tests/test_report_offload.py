"""The report's offload section from synthetic offload Results: the tables' numbers, the plot's
crossover at the Result's break-even prefix length, a valid PNG, and a report without offload
Results (or with an offload Result missing parts) that renders without the missing section."""

import io
from pathlib import Path

import pytest

from infermeter.measure.result import Result, append_jsonl
from infermeter.offload.job import break_evens, paged_break_evens
from infermeter.report.build import build_report, render, write_plots
from infermeter.report.offload_plot import offload_plots

FIXTURES = Path(__file__).parent / "fixtures" / "report"
LABEL = "gpu-x · m, batch 1"
PREFIXES = (64, 128, 256)
# TTFT ms per suffix: (serial, layerwise, recompute) at each prefix length. Suffix 16: serial's
# gain -1, -0.5, +1 crosses at 128 + 128 * 0.5 / 1.5; layer-wise's -0.5, 0, +1.5 at 128.
# Suffix 64: reload wins everywhere (below); suffix 256: recompute does (above).
TTFT = {16: ((2.0, 1.5, 1.0), (2.0, 1.5, 1.5), (2.0, 1.5, 3.0)),
        64: ((0.5, 0.6, 1.0), (0.5, 0.6, 2.0), (0.5, 0.6, 4.0)),
        256: ((5.0, 6.0, 1.0), (5.0, 6.0, 2.0), (5.0, 6.0, 4.0))}
SERIAL_CROSSING = 128 + 128 * 0.5 / 1.5
TRAFFIC = [{"direction": "d2h", "method": "dma", "tpot_ms": 10.4, "tpot_alone_ms": 10.0,
            "slowdown_pct": 4.0, "copy_gbps": 40.5, "copy_alone_gbps": 45.0,
            "same_tokens": True, "context": 4096, "batch_size": 8},
           {"direction": "both", "method": "dma", "tpot_ms": 11.0, "tpot_alone_ms": 10.0,
            "slowdown_pct": 10.0, "copy_gbps": 70.0, "copy_alone_gbps": 80.0,
            "same_tokens": False, "context": 4096, "batch_size": 8}]
STREAMED = {"tpot_ms": 20.0, "tok_per_s": 50.0, "on_device_tpot_ms": 10.0,
            "on_device_tok_per_s": 100.0, "bytes_per_step": 10**9, "link_gbps": 60.0,
            "bound_tok_per_s": 60.0, "pct_of_bound": 50 / 60 * 100, "same_tokens": True,
            "context": 8192, "batch_size": 1, "decode_steps": 32}


def offload_result(traffic=True):
    cases = []
    for suffix, rows in TTFT.items():
        for prefix, (serial, layerwise, recompute) in zip(PREFIXES, rows):
            cases.append({"prefix_len": prefix, "suffix_len": suffix,
                          "ttft_ms": {"serial": serial, "layerwise": layerwise,
                                      "recompute": recompute},
                          "reload_ms": 0.5, "suffix_prefill_ms": 1.0,
                          "layerwise_over_bound": layerwise, "same_tokens": True,
                          "fastest": min(("serial", serial), ("layerwise", layerwise),
                                         ("recompute", recompute), key=lambda t: t[1])[0],
                          # blocks of 16: 1 ms more than the whole copy, serial and layer-wise
                          "paged": [{"block_size": 16, "copies": prefix // 4, "reload_ms": 1.5,
                                     "ttft_ms": {"serial": serial + 1, "layerwise": layerwise + 1},
                                     "same_tokens": prefix != 256}]})
    metrics = {"cases": cases, "break_even": break_evens(cases, tuple(TTFT)),
               "paged_break_even": paged_break_evens(cases, tuple(TTFT), (16,)),
               "same_tokens": True}
    if traffic:
        metrics.update(traffic=TRAFFIC, offloaded_decode=STREAMED)
    return Result("offload", {"name": "m"}, {"batch_size": 1, "device": "cuda"},
                  {"device_name": "gpu-x"}, metrics, {},
                  ["prefix 64, suffix 16, serial: noisy, cov 9.0% > 5%",
                   "on the CPU every copy is synchronous"])


def report_of(tmp_path, *results):
    path = tmp_path / "offload.jsonl"
    append_jsonl(path, list(results))
    return build_report([str(path)])


def table(report, key):
    found = [t for t in report.tables if t.key == key]
    return found[0] if found else None


def test_the_tables_hold_the_results_numbers(tmp_path):
    report = report_of(tmp_path, offload_result())
    ttft = table(report, "offload")
    assert len(ttft.rows) == 9
    assert ttft.rows[1] == [LABEL, "16", "128", "2.00 ms", "1.50 ms", "1.50 ms", "layerwise",
                            "1.50", "yes"]
    breakeven = {tuple(row[1:3]): row[3:] for row in table(report, "offload-breakeven").rows}
    assert breakeven["16", "whole"] == ["~171 tokens", "~128 tokens"]
    assert breakeven["64", "whole"][0].startswith("below 64 (reload wins")
    assert breakeven["256", "whole"][1].startswith("above 256 (recompute")
    # blocks of 16, 1 ms slower: serial gains -2, -1.5, 0 (no win: above), layer-wise -1.5,
    # -1, +0.5: from 128 + 128 * 1 / 1.5
    assert breakeven["16", "blocks of 16"][0].startswith("above 256")
    assert breakeven["16", "blocks of 16"][1] == f"~{128 + 128 / 1.5:.0f} tokens"
    assert [row[2] for row in table(report, "offload-breakeven").rows] == [
        "whole", "blocks of 16"] * 3
    paged = table(report, "offload-paged").rows
    assert len(paged) == 9
    # these entries have no `copy` (as Results before --paged-copy): dma, the only way then
    assert paged[2] == [LABEL, "16", "dma", "16", "256", "64", "1.50 ms", "3.00 ms", "2.50 ms",
                        "3.00 ms", "NO"]
    traffic = table(report, "offload-traffic").rows
    assert traffic[0] == [LABEL, "batch 8 at 4,096 tokens", "d2h", "dma", "10.0 ms", "10.4 ms",
                          "+4.0%", "45.0 GB/s", "40.5 GB/s", "yes"]
    assert traffic[1][6:] == ["+10.0%", "80.0 GB/s", "70.0 GB/s", "NO"]
    (decode,) = table(report, "offload-decode").rows
    assert decode[2:] == ["20.0 ms", "50.0 tok/s", "100 tok/s", "60.0 GB/s", "60.0 tok/s",
                          "83.3%", "yes"]
    # the timing note counted, the other warning listed; no "not in these tables" note
    assert any("1 timings noisy" in n for n in report.notes)
    assert f"{LABEL}: on the CPU every copy is synchronous" in report.notes
    assert not any("not in these tables" in n for n in report.notes)
    markdown = render(report, "markdown")
    assert "## Reload vs recompute, measured break-even" in markdown
    assert "| gpu-x · m, batch 1 | 16 | whole | ~171 tokens | ~128 tokens |" in markdown


def test_the_plot_marks_the_crossover_at_the_break_even(tmp_path):
    from infermeter.report.offload import offload_labels
    from infermeter.report.offload_plot import offload_figure

    report = report_of(tmp_path, offload_result())
    ((label, record),) = offload_labels(report.offloads)
    fig = offload_figure(label, record)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["suffix 16 tokens", "suffix 64 tokens",
                                                 "suffix 256 tokens"]

    def marks(ax):
        return {line.get_gid(): line.get_xdata()[0] for line in ax.lines if line.get_gid()}

    assert marks(panels[0]) == {"break-even serial": pytest.approx(SERIAL_CROSSING),
                                "break-even layerwise": pytest.approx(128)}
    assert marks(panels[1]) == {} and marks(panels[2]) == {}
    assert "reload wins at every measured prefix" in panels[1].texts[0].get_text()
    assert "recompute as fast or faster" in panels[2].texts[0].get_text()
    # the three ways' lines: TTFT against prefix length
    serial = next(line for line in panels[0].lines if line.get_label() == "(a) serial")
    assert list(serial.get_xdata()) == list(PREFIXES)
    assert list(serial.get_ydata()) == [ways[0] for ways in TTFT[16]]
    paged = next(line for line in panels[0].lines
                 if line.get_label() == "(a) serial, blocks of 16")
    assert list(paged.get_ydata()) == [ways[0] + 1 for ways in TTFT[16]]


def test_the_plot_file_is_a_valid_png(tmp_path):
    from PIL import Image

    report = report_of(tmp_path, offload_result())
    written = write_plots(report, str(tmp_path / "plots"))
    (path,) = [p for p in written if p.name.startswith("offload-")]
    assert path.name == "offload-gpu-x-m-batch-1.png"
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.verify()  # raises on a truncated or corrupt file
    assert image.format == "PNG" and image.size[0] > 400


def test_without_offload_results_the_section_is_left_out(tmp_path):
    report = build_report([str(FIXTURES)])
    assert report.offloads == [] and offload_plots(report.offloads) == []
    assert not [t for t in report.tables if t.key.startswith("offload")]
    for fmt in ("markdown", "csv", "terminal"):
        assert "Reference table" in render(report, fmt) or fmt == "csv"


def test_an_offload_result_with_parts_missing_still_renders(tmp_path):
    bare = offload_result(traffic=False)
    partial = Result("offload", {"name": "m"}, {"batch_size": 1}, {"device_name": "gpu-x"},
                     {"cases": [{"prefix_len": 64}, "junk"], "break_even": None}, {}, [])
    report = report_of(tmp_path, bare, partial)
    assert [t.key for t in report.tables if t.key.startswith("offload")] == [
        "offload", "offload-breakeven", "offload-paged"]  # no traffic, no streamed decode
    assert {row[0] for row in table(report, "offload").rows} == {LABEL}  # #2 has no case
    for fmt in ("markdown", "csv", "terminal"):
        assert render(report, fmt)
    page = render(report, "html")  # the headline plot, and one offload plot: #2 has no case
    assert page.count("<img ") == 2 and page.count("TTFT against prefix length") == 2
    assert any(f"'{LABEL} #2' in the offload tables" in note for note in report.notes)


def test_a_mapped_paged_copy_has_its_own_rows_break_even_and_plot_lines(tmp_path):
    """--paged-copy dma mapped: each block size's entries per copy way (the mapped one 0.5 ms
    faster here), shown in the paged table's Copy column, as its own host copy in the
    break-even table, and as its own lines in the plot."""
    from infermeter.report.offload import offload_labels
    from infermeter.report.offload_plot import offload_figure

    result = offload_result(traffic=False)
    for case in result.metrics["cases"]:
        dma = case["paged"][0]
        dma["copy"] = "dma"
        case["paged"].append({**dma, "copy": "mapped", "copies": 4, "ttft_ms": {
            way: ms - 0.5 for way, ms in dma["ttft_ms"].items()}})
    result.metrics["paged_break_even"] = paged_break_evens(
        result.metrics["cases"], tuple(TTFT), (16,), ("dma", "mapped"))
    report = report_of(tmp_path, result)
    paged = table(report, "offload-paged").rows
    assert len(paged) == 18
    assert [row[2] for row in paged] == ["dma"] * 9 + ["mapped"] * 9
    assert paged[11] == [LABEL, "16", "mapped", "16", "256", "4", "1.50 ms", "2.50 ms",
                         "2.00 ms", "3.00 ms", "NO"]
    breakeven = {tuple(row[1:3]): row[3:] for row in table(report, "offload-breakeven").rows}
    assert [row[2] for row in table(report, "offload-breakeven").rows] == [
        "whole", "blocks of 16", "blocks of 16, mapped"] * 3
    # mapped, 0.5 ms slower than the whole copy: layer-wise gains -1, -0.5, +1: from
    # 128 + 128 * 0.5 / 1.5
    assert breakeven["16", "blocks of 16, mapped"][1] == f"~{128 + 128 * 0.5 / 1.5:.0f} tokens"
    ((label, record),) = offload_labels(report.offloads)
    panel = [ax for ax in offload_figure(label, record).axes if ax.get_visible()][0]
    mapped = next(line for line in panel.lines
                  if line.get_label() == "(a) serial, blocks of 16, mapped")
    assert list(mapped.get_ydata()) == [ways[0] + 0.5 for ways in TTFT[16]]
