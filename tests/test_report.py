"""`infermeter report`: tables, break-even, plots and bad input, from the fixture Results.

The fixtures (tests/fixtures/report/) are hand-written Results with plausible numbers, not
measurements: copy Results of an H100 and an H200, generate Results of both (a batch and context
sweep on the H100, a tp-2 run, one implausible run above the HBM roofline), a kv Result, one of an
older schema and one with fields missing. tests/fixtures/report-bad/ holds files that are not
Results at all.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from infermeter.errors import InfermeterError
from infermeter.report import render as text_render
from infermeter.report.build import build_report, render, write_plots
from infermeter.report.derive import CONTEXTS, break_even, prefill_ms
from infermeter.report.load import Record
from infermeter.report.select import Column, ColumnKey
from infermeter.report.tables import REFERENCE_ROWS
from tests.cli_in_process import run_cli as run_in_process

FIXTURES = Path(__file__).parent / "fixtures"
GOOD, BAD = FIXTURES / "report", FIXTURES / "report-bad"
H100 = "NVIDIA H100 80GB HBM3 · llama-2-7b"
H200 = "NVIDIA H200 · llama-2-7b"


def table(report, key):
    (found,) = [t for t in report.tables if t.key == key]
    return found


def cells(tab, column):
    index = tab.header.index(column)
    return {row[0]: row[index] for row in tab.rows}


@pytest.fixture(scope="module")
def report():
    return build_report([str(GOOD)])


def test_reference_table_rows_columns_and_units(report):
    ref = table(report, "reference")
    assert ref.header == ["Device", "NVIDIA A100-SXM4-80GB · llama-2-7b",
                          "2× NVIDIA H100 80GB HBM3 · llama-2-13b (tp 2)", H100, H200,
                          "unknown device · unknown model"]
    assert [row[0] for row in ref.rows] == list(REFERENCE_ROWS)
    h100 = cells(ref, H100)
    assert h100["KV Cache Size"] == "256.0 MiB (1×512)"
    # engine layout, pinned, fastest method (staged 53.5 GB/s beats per-tensor 52.0)
    assert h100["Moving Bandwidth"] == "53.5 GB/s, 53.5 GB/s"
    assert h100["Moving Time (htod, dtoh)"] == "5.02 ms, 5.02 ms"
    # batch 1, compiled, context 512: 256 tokens in 14 ms + 255 x 5.9 ms
    assert h100["Total Tokens"] == "256"
    assert h100["Token Generation Time"] == "1.52 s"
    assert h100["Token Generation Speed"] == "169 tok/s"
    assert "engine layout" in ref.caption and "batch 1" in ref.caption


def test_extended_table_picks_and_warnings(report):
    ext = cells(table(report, "extended"), H100)
    assert ext["Generate setting"] == "compiled, float16, batch 1, prompt 128, context 512"
    assert ext["TPOT p50 / p90"] == "5.90 ms / 6.02 ms"
    assert ext["Decode speed, best batch"] == "1,524 tok/s (batch 32)"
    assert ext["Link % (htod, dtoh)"] == "84.9%, 84.9%"
    assert ext["Moving case (htod, dtoh)"] == "engine staged, engine staged"
    assert ext["MBU"] == "77.7%"
    h200 = cells(table(report, "extended"), H200)
    assert h200["Warnings"].startswith("3 (notes")
    assert any("above the HBM roofline" in n and n.startswith(H200) for n in report.notes)
    assert any("noisy, cov 9.0%" in n for n in report.notes)


def test_old_schema_and_missing_fields_render_with_a_note(report):
    old = cells(table(report, "reference"), "NVIDIA A100-SXM4-80GB · llama-2-7b")
    assert old["Total Tokens"] == "432" and old["Token Generation Speed"] == "-"
    assert old["KV Cache Size"] == "256.0 MiB (1×512, analytic)"  # from the kv Result
    assert cells(table(report, "extended"), "NVIDIA A100-SXM4-80GB · llama-2-7b")[
        "TPOT p50 / p90"] == "24.5 ms / -"  # an old Result's single TPOT number is its p50
    unknown = cells(table(report, "extended"), "unknown device · unknown model")
    assert unknown["TTFT"] == "30.0 ms"
    assert any("old-schema.json: schema 0" in n for n in report.notes)
    assert any("missing-fields.json: fields missing: model, env" in n for n in report.notes)


def test_breakeven_from_measured_points(report):
    be = cells(table(report, "breakeven"), H100)
    # reload: 512 x 512 KiB / 53.5 GB/s; prefill: between (128, 14 ms) and (1024, 68 ms), the
    # compiled run's 14 ms at 128 tokens being faster than the eager one's 15
    assert be["512 tokens (reload vs prefill)"] == (
        "5.02 ms vs 37.1 ms: reload (interpolated: linear between the 128-token and 1,024-token "
        "measurements)")
    assert be["128 tokens (reload vs prefill)"] == "1.25 ms vs 14.0 ms: reload (measured)"
    # beyond the longest prompt (4096 in 310 ms): linear at its throughput
    assert be["32,768 tokens (reload vs prefill)"] == (
        "321 ms vs 2,480 ms: reload (extrapolated: linear in tokens from the 4,096-token "
        "measurement)")
    # the H200 measured no 4096-token prompt: its row there is extrapolated from 1024
    assert cells(table(report, "breakeven"), H200)["4,096 tokens (reload vs prefill)"].endswith(
        "(extrapolated: linear in tokens from the 1,024-token measurement)")
    assert table(report, "breakeven").header == ["Context", H100, H200]
    assert cells(table(report, "extended"), H100)["Reload wins from"].startswith(
        "every context 128-32,768 tokens")


def build_report_from_columns(columns):
    from infermeter.report.tables import Report, breakeven_table

    return Report([breakeven_table(columns)], [], columns)


def test_prefill_model_is_piecewise_linear():
    points = ((100.0, 10.0), (1000.0, 200.0))
    assert prefill_ms(points, 50) == pytest.approx(5.0)  # from (0, 0)
    assert prefill_ms(points, 550) == pytest.approx(105.0)  # interpolated
    assert prefill_ms(points, 4000) == pytest.approx(800.0)  # 1000 tok in 200 ms, linear


def _record(kind, metrics, config, source):
    return Record(kind, {"name": "m"}, config, {"device_name": "gpu"}, metrics, (), source)


def test_breakeven_crossing_where_reload_starts_to_win():
    # 1 MB per token at 1 GB/s = 1 ms per token to reload; prefill costs 0.5 ms per token up to
    # 1024 tokens and 2 ms per token after: the lines cross at 1536, so reload wins from 2048
    case = {"layout": "engine", "host_memory": "pinned", "direction": "h2d", "method": "staged",
            "gbps": 1.0, "moving_time_ms": 1.0}
    copy = _record("copy", {"cases": [case], "kv_cache_bytes": 1e6 * 512},
                   {"batch_size": 1, "seq_len": 512}, "c")
    gens = [_record("generate", {"ttft_ms": ms}, {"batch_size": 1, "prompt_len": n}, f"g{n}")
            for n, ms in ((1024, 512.0), (4096, 6656.0))]
    result = break_even(Column(ColumnKey("gpu", "m", 1), copies=[copy], generates=gens))
    winners = {row.context: row.winner == "reload" for row in result.rows}
    assert [winners[n] for n in CONTEXTS] == [False, False, True, True, True, True, True]
    assert result.wins_from == 2048


def _synthetic_column(points, ms_per_token=1.0):
    """A column reloading at `ms_per_token` (1 MB per token at 1 GB/s: 1 ms) with batch-1
    generate Results of (prompt tokens, TTFT ms) `points`."""
    case = {"layout": "engine", "host_memory": "pinned", "direction": "h2d", "method": "staged",
            "gbps": 1.0 / ms_per_token, "moving_time_ms": 1.0}
    copy = _record("copy", {"cases": [case], "kv_cache_bytes": 1e6 * 512},
                   {"batch_size": 1, "seq_len": 512}, "c")
    gens = [_record("generate", {"ttft_ms": ms}, {"batch_size": 1, "prompt_len": n,
                                                  "mode": "compiled"}, f"g{n}")
            for n, ms in points]
    return Column(ColumnKey("gpu", "m", 1), copies=[copy], generates=gens)


def test_breakeven_rows_use_the_measured_prefills_and_say_what_is_estimated():
    # reload 1 ms per token; prefill 0.5 ms per token up to 512, then 2 ms per token at 2048
    column = _synthetic_column(((80, 40.0), (512, 256.0), (2048, 4096.0)))
    rows = {row.context: row for row in break_even(column).rows}
    assert sorted(rows) == [80, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert [n for n, row in rows.items() if row.measured] == [80, 512, 2048]
    assert (rows[80].prefill_ms, rows[512].prefill_ms, rows[2048].prefill_ms) == (40, 256, 4096)
    assert rows[1024].how == ("interpolated: linear between the 512-token and 2,048-token "
                              "measurements")
    assert rows[1024].prefill_ms == pytest.approx(256 + (4096 - 256) * 512 / 1536)
    assert rows[8192].how == "extrapolated: linear in tokens from the 2,048-token measurement"
    assert rows[8192].prefill_ms == pytest.approx(4 * 4096)
    winners = {n: row.winner for n, row in rows.items()}
    assert winners == {80: "recompute", 512: "recompute", 1024: "reload", 2048: "reload",
                       4096: "reload", 8192: "reload", 16384: "reload", 32768: "reload"}
    assert break_even(column).wins_from == 1024
    tab = table(build_report_from_columns([column]), "breakeven")
    assert cells(tab, "gpu · m")["80 tokens (reload vs prefill)"] == (
        "80.0 ms vs 40.0 ms: recompute (measured)")


def _with_context(column, positions, name="m"):
    """The column's Results as those of a model of `positions` positions (model.max_seq_len)."""
    for record in (*column.copies, *column.generates):
        record.model.update(name=name, max_seq_len=positions)
    column.key = ColumnKey("gpu", name, 1)
    return column


def test_breakeven_rows_stop_at_the_models_context():
    # llama-2-7b's 4,096 positions: no 8k-32k rows, the ladder's 4,095 measured one kept
    column = _with_context(_synthetic_column(((80, 8.0), (4095, 800.0))), 4096)
    result = break_even(column)
    assert [row.context for row in result.rows] == [80, 512, 1024, 2048, 4095, 4096]
    assert cells(table(report_of(column), "breakeven"), "gpu · m").keys() >= {
        "4,096 tokens (reload vs prefill)"}
    assert "8,192 tokens (reload vs prefill)" not in cells(table(report_of(column), "breakeven"),
                                                           "gpu · m")
    # a random model run with more positions (generate --max-positions) keeps those rows
    column.generates[0].config["max_positions"] = 16384
    assert break_even(column).rows[-1].context == 16384
    # a Result that does not say its context (older files): the whole grid, as before
    for record in (*column.copies, *column.generates):
        record.model.pop("max_seq_len")
        record.config.pop("max_positions", None)
    assert break_even(column).rows[-1].context == CONTEXTS[-1]


def test_a_shorter_context_column_says_so_past_its_own_rows():
    short = _with_context(_synthetic_column(((80, 8.0),)), 4096, "short")
    long = _with_context(_synthetic_column(((80, 8.0),)), 131072, "long")
    tab = table(report_of(short, long), "breakeven")
    assert tab.rows[-1][0] == "32,768 tokens (reload vs prefill)"
    assert cells(tab, "gpu · short")["8,192 tokens (reload vs prefill)"] == (
        "- (past the model's 4,096 positions)")
    assert cells(tab, "gpu · long")["8,192 tokens (reload vs prefill)"].endswith(
        "(extrapolated: linear in tokens from the 80-token measurement)")
    assert cells(tab, "gpu · short")["4,096 tokens (reload vs prefill)"].startswith("4,096 ms")
    # the extended table's verdict spans the model's own rows only
    assert break_even(short).rows[-1].context == 4096


def report_of(*columns):
    return build_report_from_columns(list(columns))


def test_breakeven_with_one_measured_prompt_extrapolates_every_other_row():
    rows = break_even(_synthetic_column(((80, 8.0),))).rows
    assert [row.context for row in rows if row.measured] == [80]
    assert all(row.how == "extrapolated: linear in tokens from the 80-token measurement"
               for row in rows if row.context != 80)
    # 0.1 ms per token to prefill, 1 ms to reload: recompute everywhere
    assert {row.winner for row in rows} == {"recompute"}


def test_markdown_and_csv_are_byte_identical_whatever_the_path_order():
    one = build_report([str(GOOD / "generate-h100.jsonl"), str(GOOD)])
    two = build_report([str(GOOD), str(GOOD / "generate-h100.jsonl")])
    for fmt in ("markdown", "csv"):
        assert render(one, fmt) == render(two, fmt) == render(build_report([str(GOOD)]), fmt)
    text = render(one, "markdown")
    assert "| Device | NVIDIA A100" in text and "2026" not in text  # no timestamps


def test_csv_holds_every_table_and_the_notes(report):
    lines = render(report, "csv").splitlines()
    assert lines[0].startswith("reference,Device,NVIDIA A100-SXM4-80GB · llama-2-7b,")
    assert any(line.startswith("extended,TTFT,") for line in lines)
    assert any(line.startswith("breakeven,Context,") for line in lines)
    assert lines[-1].startswith("notes,")


def test_bad_inputs_are_skipped_with_a_warning_naming_each(report):
    warnings = []
    mixed = build_report([str(GOOD), str(BAD), str(FIXTURES / "nowhere.json")],
                         warn=warnings.append)
    named = " ".join(warnings)
    for name in ("binary.json", "broken.jsonl", "not-a-result.json", "numbers.json",
                 "unknown-kind.json", "nowhere.json", "script-log.json"):
        assert name in named
    # numbers.json (a list of no objects), script-log.json (a list of objects, none a Result:
    # a benchmark's own log) and broken.jsonl (two lines, neither a Result) are one warning
    # each, not one per item or line
    assert len(warnings) == 7
    assert "script-log.json: not infermeter Results (a list of 3 items" in named
    assert "broken.jsonl: not infermeter Results (2 lines, none a Result; line 1: " in named
    assert render(mixed, "markdown") == render(report, "markdown")


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(InfermeterError, match="no infermeter Results"):
        build_report([str(BAD)])
    with pytest.raises(InfermeterError, match="0 file"):
        build_report([str(tmp_path)])


def test_seed_column(report):
    seeded = build_report([str(GOOD)], with_seed=True)
    ref = table(seeded, "reference")
    assert ref.header[1] == "RTX 3090 (seed scripts) · llama-2-7b-chat"
    seed = cells(ref, ref.header[1])
    assert seed["Moving Bandwidth"] == "12.8 GB/s each way (seed: 12.2 GiB/s)"
    assert seed["Token Generation Speed"] == "47.0 tok/s"
    assert "typed in, not measured" in seeded.notes[0]


def test_plots_are_pngs_and_written_atomically(report, tmp_path):
    pytest.importorskip("matplotlib")
    written = write_plots(report, str(tmp_path / "plots"))
    names = sorted(p.name for p in written)
    assert names == ["copy-nvidia-h100-80gb-hbm3-llama-2-7b.png", "copy-nvidia-h200-llama-2-7b.png",
                     "decode-batch.png", "headline.png", "tpot-context.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names  # no temp files left


def test_terminal_uses_rich_or_falls_back_to_plain(report, monkeypatch):
    text = render(report, "terminal", width=200)
    assert "Reference table" in text and "Moving Bandwidth" in text and "Notes:" in text
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    plain = text_render.render_terminal(report)
    assert "== Reference table ==" in plain and "53.5 GB/s, 53.5 GB/s" in plain


def test_html_is_self_contained(report, monkeypatch):
    pytest.importorskip("matplotlib")
    page = render(report, "html")
    assert page.count("<img ") == 5 and page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page
    monkeypatch.setattr("infermeter.report.build._plots_available", lambda: False)
    bare = render(report, "html")
    assert "<img " not in bare and "plots need matplotlib" in bare


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "infermeter", "report", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_no_results_is_one_line_and_exit_2(tmp_path):
    out = run_cli(str(tmp_path))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"infermeter: error: no infermeter Results in {tmp_path} (0 file(s) read, 0 skipped)"]
    bad = run_cli(str(BAD))
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("infermeter: error:")
    assert "Traceback" not in bad.stderr


def test_cli_a_path_that_does_not_exist_is_one_error_line(tmp_path):
    """It was a warning, then a report without that path's Results and exit 0."""
    missing = tmp_path / "resluts"
    out = run_cli(str(GOOD), str(missing), "--output", str(tmp_path / "r.md"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"infermeter: error: {missing}: no such file or folder"]
    assert list(tmp_path.iterdir()) == []


def test_cli_an_output_it_cannot_write_is_the_only_line(tmp_path):
    """A missing folder or a folder as --output: one error line before any input is read (it
    came after the skipped inputs' warnings)."""
    for output, says in ((tmp_path / "nodir" / "r.md", f"folder {tmp_path / 'nodir'} does not "
                          "exist"), (tmp_path, "a folder; --output names the report file")):
        out = run_cli(str(GOOD), str(BAD), "--output", str(output), "--format", "markdown")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [f"infermeter: error: {output}: {says}"]
    assert list(tmp_path.iterdir()) == []


def test_cli_an_output_that_is_an_input_is_refused_and_left_unchanged(tmp_path):
    """It was overwritten by the report of itself, exit 0: named as a file, found in a named
    folder, or reached through a link."""
    import shutil

    results = tmp_path / "A"
    shutil.copytree(GOOD, results)
    victim = results / "generate-h100.jsonl"
    before = victim.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(victim)
    for inputs, output in (([str(victim)], str(victim)), ([str(results)], str(victim)),
                           ([str(results)], str(tmp_path / "link.jsonl"))):
        out = run_in_process("report", *inputs, "--output", output, "--format", "csv")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"infermeter: error: --output {output} is the input {victim}: the report would "
            "overwrite it; name another file"]
        assert victim.read_bytes() == before
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in GOOD.iterdir())


def test_cli_an_existing_folder_as_output_is_named_as_a_folder(tmp_path):
    """Without --format, a folder got "cannot tell the report format from a name without a
    suffix": the format was asked first."""
    folder = tmp_path / "reports"
    folder.mkdir()
    out = run_in_process("report", str(GOOD), "--output", str(folder))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"infermeter: error: {folder}: a folder; --output names the report file"]
    assert list(folder.iterdir()) == []


def test_cli_writes_the_format_its_output_names(tmp_path):
    out = run_cli(str(GOOD), str(BAD), "--output", str(tmp_path / "r.md"))
    assert out.returncode == 0, out.stderr
    assert "warning: skipped" in out.stderr and "not-a-result.json" in out.stderr
    text = (tmp_path / "r.md").read_text()
    assert text.startswith("# infermeter report") and "| Moving Bandwidth |" in text
    csv = run_cli(str(GOOD), "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.startswith("reference,Device,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]  # no temp file left


def test_cli_output_suffix_names_a_known_format_or_is_an_error(tmp_path):
    """r.xyz once got the terminal format; a suffix that names no format is now one error line
    (nothing written), .txt is the terminal text, and --format overrides any suffix."""
    for name, what in (("r.xyz", "the suffix '.xyz'"), ("report", "a name without a suffix")):
        out = run_cli(str(GOOD), "--output", str(tmp_path / name))
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"infermeter: error: --output {tmp_path / name}: cannot tell the report format from "
            f"{what}; name the file .md, .csv, .html or .txt (terminal text), or give --format"]
    assert list(tmp_path.iterdir()) == []
    text = run_cli(str(GOOD), "--output", str(tmp_path / "r.txt"))
    assert text.returncode == 0 and "(terminal)" in text.stderr
    assert "Reference table" in (tmp_path / "r.txt").read_text()
    forced = run_cli(str(GOOD), "--output", str(tmp_path / "r.xyz"), "--format", "csv")
    assert forced.returncode == 0
    assert (tmp_path / "r.xyz").read_text().startswith("reference,Device,")


def test_cli_bad_plots_folder_fails_before_the_report(tmp_path):
    import importlib.util

    taken = tmp_path / "plots"
    taken.write_text("a file")
    out = run_cli(str(GOOD), "--plots", str(taken))
    assert out.returncode == 2 and out.stdout == ""  # no report printed before the error
    why = f"--plots {taken}: a file, not a folder" if importlib.util.find_spec("matplotlib") \
        else "plots need matplotlib"
    assert len(out.stderr.splitlines()) == 1 and why in out.stderr
    # a folder that cannot be made (under a file): the report was printed, then the error
    under_file = taken / "plots"
    out = run_cli(str(GOOD), "--plots", str(under_file))
    assert out.returncode == 2 and out.stdout == ""
    why = f"{under_file}: cannot create the plots folder" \
        if importlib.util.find_spec("matplotlib") else "plots need matplotlib"
    assert len(out.stderr.splitlines()) == 1 and why in out.stderr


def test_importing_the_report_loads_no_plotting():
    code = ("import sys, infermeter.report.build, infermeter.report.plots, infermeter.cli; "
            "assert 'matplotlib' not in sys.modules and 'rich' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_reference_column_takes_the_seed_shaped_generate_result(tmp_path):
    """A 64-token run at context 512 and the seed's 432 tokens in a 512 cache: the seed's wins."""
    from infermeter.report.load import Record
    from infermeter.report.select import Column, ColumnKey, off_default_kernels, pick_generate

    def record(line, **config):
        base = {"batch_size": 1, "mode": "compiled", "prompt_len": 80}
        metrics = {"decode_tok_per_s": 100.0, "tpot_ms": {"p50": 10.0}, "ttft_ms": 20.0,
                   "total_tokens": config.get("max_new_tokens"), "token_generation_time_s": 1.0}
        return Record(kind="generate", model={"name": "m"}, config={**base, **config},
                      env={}, metrics=metrics, warnings=(), source=f"f.jsonl:{line}")

    context_run = record(1, context=512, max_new_tokens=64, cache_len=576)
    seed_run = record(2, max_new_tokens=432, cache_len=512)
    column = Column(ColumnKey("gpu", "m", 1), generates=[context_run, seed_run])
    assert pick_generate(column) is seed_run
    # a TTFT run (a long prompt, 2 new tokens) times a prefill, not generation: never picked
    ttft_run = record(5, max_new_tokens=2, cache_len=512, prompt_len=510)
    assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=[ttft_run])) is None
    assert pick_generate(Column(ColumnKey("gpu", "m", 1),
                                generates=[ttft_run, context_run])) is context_run
    # The same shape run with the default kernels (at batch 1: the Triton attention, "auto"'s
    # pick, and the Triton GEMV) and as comparisons (the sweep's kernel part: inductor's
    # products; its gemv part: the math attention; one-shot all-reduces; a Result from before
    # the settings were recorded, which ran inductor's products; one without PDL, on by default
    # where it runs): the default's represents the column, in any order and whatever the file
    # lines.
    shape = {"max_new_tokens": 432, "cache_len": 512}
    default = record(7, decode_attention="triton", matvec_kernel="triton", pdl=True, **shape)
    kernel_part = record(11, decode_attention="triton", matvec_kernel="inductor", **shape)
    gemv_part = record(3, decode_attention="math", matvec_kernel="triton", **shape)
    one_shot = record(4, decode_attention="triton", matvec_kernel="triton",
                      tp_all_reduce="one-shot", **shape)
    older = record(12, **shape)
    no_pdl = record(13, decode_attention="triton", matvec_kernel="triton", pdl=False, **shape)
    # the whole model compiled per bucket (--prefill-graphs static), not the default layer graphs
    static = record(14, decode_attention="triton", matvec_kernel="triton", pdl=True,
                    prefill_graphs="static", **shape)
    runs = [kernel_part, gemv_part, one_shot, older, no_pdl, static, default]
    for order in (runs, runs[::-1]):
        assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=order)) is default
    for other in runs[:-1]:
        assert off_default_kernels(other), other.source
    assert not off_default_kernels(default)
    for graphs in ("layer", None):  # None: an exact prefill, or a Result from before the field
        assert not off_default_kernels(dataclasses.replace(
            default, config={**default.config, "prefill_graphs": graphs}))
    # "static" was the default until 2026-12-05 14:29 UTC (commit e2ae286): a Result made
    # before then ran the default; "dynamic" never was one
    for graphs, stamp, off in (("static", "2026-12-05T14:13:45+00:00", False),
                               ("static", "2026-12-05T14:30:00+00:00", True),
                               ("static", None, True),
                               ("static", "2026-12-05T14:00:00", False),  # no zone: UTC
                               ("static", "2026-12-05 15:00", True),
                               ("dynamic", "2026-12-05T14:00:48+00:00", True)):
        run = dataclasses.replace(static, env={"timestamp": stamp} if stamp else {})
        assert off_default_kernels(dataclasses.replace(
            run, config={**static.config, "prefill_graphs": graphs})) is off, (graphs, stamp)
    # where the default's "layer" runs as "static" (a Result records what ran): tensor
    # parallelism and the cudagraphs backend
    later = dataclasses.replace(static, env={"timestamp": "2026-12-06T00:00:00+00:00"})
    for extra, off in (({"tp": 2, "tp_all_reduce": "triton"}, False),
                       ({"compile_backend": "cudagraphs"}, False),
                       ({"tp": 1, "compile_backend": "inductor"}, True)):
        assert off_default_kernels(dataclasses.replace(
            later, config={**static.config, **extra})) is off, extra
    assert off_default_kernels(dataclasses.replace(
        later, config={**static.config, "tp": 2, "tp_all_reduce": "triton",
                       "prefill_graphs": "dynamic"}))
    # The same case measured again later (e.g. the sweep's seed1 part after a kernel change):
    # the newest timestamp represents the column, whatever the file lines; no timestamp is last.
    def stamped(line: int, stamp: str | None) -> Record:
        run = record(line, decode_attention="triton", matvec_kernel="triton", pdl=True, **shape)
        return dataclasses.replace(run, env={"timestamp": stamp} if stamp else {})

    earlier = stamped(1, "2026-11-26T21:29:26+00:00")
    later = stamped(9, "2026-11-26T22:05:00+00:00")
    unstamped = stamped(0, None)
    for order in ([earlier, later, unstamped], [unstamped, later, earlier]):
        assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=order)) is later


def test_report_knows_the_engines_default_kernels():
    """report_select's torch-free copies of the engine's defaults are the engine's."""
    from infermeter.cli import build_parser
    from infermeter.engine.linear import MATVEC_KERNEL
    from infermeter.engine.parallel.all_reduce import ALL_REDUCE_KINDS, AUTO_ALL_REDUCE
    from infermeter.generate.request import GenerateRequest
    from infermeter.report.select import DEFAULT_MATVEC_KERNEL, DEFAULT_TP_ALL_REDUCE

    request = GenerateRequest(source="random:debug")
    cli = build_parser().parse_args(["generate", "--model", "debug"])  # the CLI's defaults
    assert DEFAULT_MATVEC_KERNEL == MATVEC_KERNEL == request.engine.matvec_kernel \
        == cli.matvec_kernel
    assert ALL_REDUCE_KINDS[0] == request.engine.tp_all_reduce == cli.tp_all_reduce == "auto"
    assert DEFAULT_TP_ALL_REDUCE == AUTO_ALL_REDUCE  # what auto picks on one host's GPUs
    from infermeter.engine.sampling import ARGMAX_PARTS, DEFAULT_ARGMAX_PARTS
    from infermeter.report.select import DEFAULT_ARGMAX_PARTS as REPORTED
    assert REPORTED == DEFAULT_ARGMAX_PARTS == ARGMAX_PARTS
    from infermeter.engine.prefill_buckets import PREFILL_GRAPHS
    from infermeter.report.select import DEFAULT_PREFILL_GRAPHS
    assert DEFAULT_PREFILL_GRAPHS == PREFILL_GRAPHS[0] == request.engine.prefill_graphs


def test_breakdown_plot_stacks_each_traced_column(tmp_path):
    """A generate Result with a --trace breakdown gets a stacked bar; none without one."""
    pytest.importorskip("matplotlib")
    from infermeter.report.plots import plot_breakdown

    def record(categories):
        metrics = {"decode_tok_per_s": 100.0, "breakdown": {"step_ms": 5.0,
                                                            "categories": categories}}
        return Record(kind="generate", model={"name": "m"}, env={}, warnings=(),
                      config={"batch_size": 1, "mode": "compiled"}, metrics=metrics,
                      source="f.jsonl:1")

    traced = record([{"name": "matmul (unattributed)", "time_ms": 4.5},
                     {"name": "attention", "time_ms": 0.4}, {"name": "gaps (idle)",
                                                             "time_ms": 0.1}])
    plain = Record(kind="generate", model={"name": "m"}, env={}, warnings=(),
                   config={"batch_size": 1}, metrics={"decode_tok_per_s": 1.0}, source="g:1")
    with_trace = Column(ColumnKey("gpu", "m", 1), generates=[plain, traced])
    without = Column(ColumnKey("gpu2", "m", 1), generates=[plain])
    plot = plot_breakdown([with_trace, without])
    assert plot.name == "decode-step-breakdown.png" and plot.png.startswith(b"\x89PNG")
    assert plot_breakdown([without]) is None


def test_the_cache_size_of_a_tp_column_is_per_rank(tmp_path):
    """Under tp each rank moves its own KV shard: the cell says "per rank"."""
    result = json.loads((GOOD / "copy-h100.jsonl").read_text().splitlines()[0])
    result["config"]["tp"] = 2
    (tmp_path / "tp2.jsonl").write_text(json.dumps(result) + "\n")
    ref = table(build_report([str(tmp_path)]), "reference")
    (column,) = [c for c in ref.header if "(tp 2)" in c]
    assert cells(ref, column)["KV Cache Size"] == "256.0 MiB per rank (1×512)"


def test_generate_setting_names_the_kernels_that_ran():
    from infermeter.report.load import Record
    from infermeter.report.tables import _generate_setting

    def setting(**extra):
        config = {"mode": "compiled", "dtype": "float16", "batch_size": 1, "prompt_len": 80,
                  **extra}
        return _generate_setting(Record(kind="generate", model={"name": "m"}, config=config,
                                        env={}, metrics={}, warnings=(), source="f:1"))

    assert setting() == "compiled, float16, batch 1, prompt 80"  # older Results
    assert setting(decode_attention="math", matvec_kernel="inductor", tp_all_reduce=None) == \
        "compiled, float16, batch 1, prompt 80, math attention"
    assert setting(decode_attention="triton", matvec_kernel="triton",
                   tp_all_reduce="one-shot") == ("compiled, float16, batch 1, prompt 80, triton "
                                                 "attention, Triton GEMV, one-shot all-reduce")


def test_a_machine_with_only_untimed_results_gets_notes_not_a_column(tmp_path):
    """tp_sweep's start-to-exit log is a generate Result without timing (config.benchmark
    "tp_runs"), as is an out-of-memory case, and a TTFT run (2 new tokens) times no generation:
    alone on their machine and model they make no column of dashes in the tables, and the notes
    still say why each is left out."""
    result = json.loads((GOOD / "copy-h100.jsonl").read_text().splitlines()[0])
    untimed = {"kind": "generate", "model": {"name": "llama-3.2-1b"}, "env": result["env"],
               "warnings": [], "schema": result.get("schema", 1)}
    runs = {**untimed, "config": {"benchmark": "tp_runs", "tp": 2}, "metrics": {"runs": []}}
    oom = {**untimed, "model": {"name": "llama-2-70b"}, "config": {"batch_size": 64},
           "metrics": {"oom": True, "ttft_ms": None}}
    # a TTFT run: timed, but its 2 new tokens time a prefill, not generation
    ttft = {**untimed, "model": {"name": "llama-3.1-8b"},
            "config": {"batch_size": 1, "prompt_len": 32768, "max_new_tokens": 2,
                       "mode": "compiled"},
            "metrics": {"ttft_ms": 1493.99, "token_generation_speed": 0.8}}
    (tmp_path / "copy.jsonl").write_text(json.dumps(result) + "\n")
    (tmp_path / "runs.jsonl").write_text(json.dumps(runs) + "\n" + json.dumps(oom) + "\n" +
                                         json.dumps(ttft) + "\n")
    built = build_report([str(tmp_path)])
    header = table(built, "reference").header
    assert len(header) == 2 and "llama-2-7b" in header[1]  # the copy's column only
    assert any("runs.jsonl:1: a generate Result without timing metrics (benchmark tp_runs)"
               in note for note in built.notes)
    assert any("runs.jsonl:2: a generate Result without timing metrics (out of memory)"
               in note for note in built.notes)
    assert any("runs.jsonl:3: a prefill-only generate Result (2 new tokens) of a machine and "
               "model with no generation timed, not in the tables" in note
               for note in built.notes)


def test_a_cpu_column_shows_its_host_memory_copy_and_says_why_no_break_even():
    """A CPU run has no pinned case: the reference table showed '-' for moving although the
    copy stage ran, and the note said the column lacked a copy and a batch-1 TTFT it had."""
    from infermeter.report.build import assemble
    from infermeter.report.select import pick_copy

    def case(host, direction, gbps):
        return {"layout": "engine", "host_memory": host, "direction": direction,
                "method": "per-tensor", "gbps": gbps, "moving_time_ms": 0.004,
                "host_pinned": False}

    cpu_cases = [case(h, d, g) for h, g in (("seed", 9.0), ("pageable", 7.0))
                 for d in ("h2d", "d2h")]
    copy = _record("copy", {"cases": cpu_cases, "kv_cache_bytes": 32768},
                   {"batch_size": 1, "seq_len": 64}, "r.jsonl:2")
    gen = _record("generate", {"ttft_ms": 0.8, "total_tokens": 54, "generation_time_s": 0.03},
                  {"batch_size": 1, "prompt_len": 10, "mode": "eager"}, "r.jsonl:3")
    column = Column(ColumnKey("cpu", "debug", 1), copies=[copy], generates=[gen])
    pick = pick_copy(column)
    assert pick.host == "pageable" and pick.h2d["gbps"] == 7.0  # pageable before the seed's
    report = assemble([column], [copy, gen], [])
    ref = cells(table(report, "reference"), "cpu · debug")
    assert ref["Moving Time (htod, dtoh)"] == "0.004 ms, 0.004 ms (pageable host memory)"
    assert ref["Moving Bandwidth"] == "7.0 GB/s, 7.0 GB/s (pageable host memory)"
    ext = cells(table(report, "extended"), "cpu · debug")
    assert ext["Moving case (htod, dtoh)"] == ("engine per-tensor (pageable host), "
                                               "engine per-tensor (pageable host)")
    assert report.notes[-1] == (
        "Reload vs recompute: no break-even was derived; cpu · debug: its copies are from "
        "pageable host memory only (a CPU run has no pinned memory) and reload is figured from "
        "pinned memory")
    assert not any("asked for pinned" in note for note in report.notes)
    # A pinned case, however slow, still represents a GPU column and gives the break-even.
    gpu_copy = dataclasses.replace(copy, metrics={**copy.metrics, "cases": [
        *cpu_cases, case("pinned", "h2d", 1.0), case("pinned", "d2h", 1.0)]})
    gpu = Column(ColumnKey("cpu", "debug", 1), copies=[gpu_copy], generates=[gen])
    assert pick_copy(gpu).host == "pinned" and break_even(gpu) is not None
    gpu_ref = cells(table(assemble([gpu], [gpu_copy, gen], []), "reference"), "cpu · debug")
    assert gpu_ref["Moving Bandwidth"] == "1.0 GB/s, 1.0 GB/s"


def test_a_line_that_is_not_utf8_skips_that_line_only(tmp_path):
    """One broken line (a log line in another encoding, a torn write) skipped the whole file."""
    from infermeter.report.load import load_records

    good = (GOOD / "generate-h100.jsonl").read_bytes().splitlines()[0]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n\xff\xfe caf\xe9\n" + good + b"\n")
    loaded = load_records([path])
    assert [r.source for r in loaded.records] == [f"{path}:1", f"{path}:3"]
    assert loaded.skipped == [f"{path}:2: not UTF-8 text"]


def test_a_file_with_no_result_on_any_line_is_one_warning(tmp_path):
    """A text file or a log handed to the report (every line skipped) gives one warning
    naming its first line's reason, not one per line; a one-line file keeps its own."""
    from infermeter.report.load import load_records

    log = tmp_path / "run.log"
    log.write_text("compiling...\n{\"step\": 1}\n\ndone\n")
    note = tmp_path / "note.jsonl"
    note.write_text("not json\n")
    loaded = load_records([log, note])
    assert loaded.records == []
    assert loaded.skipped == [
        f"{log}: not infermeter Results (3 lines, none a Result; line 1: not JSON (Expecting "
        "value))", f"{note}:1: not JSON (Expecting value)"]


def test_prefill_ladder_results_feed_the_breakeven_not_the_reference_column():
    """`infermeter run`'s ladder Results (one new token: TTFT only) are prefill points; the
    tokens rows keep the reference run, and the missing decode timing is not a warning."""
    from infermeter.report.derive import column_warnings
    from infermeter.report.select import pick_generate

    column = _synthetic_column(((80, 8.0),))
    reference = column.generates[0]
    # eager, where the ladder is compiled: compiled ranks first for any other Result
    reference.config.update(max_new_tokens=432, cache_len=512, mode="eager")
    reference.metrics.update(tpot_ms={"p50": 1.0, "n": 431})
    ladder = _record("generate", {"ttft_ms": 40.0}, {
        "batch_size": 1, "prompt_len": 512, "mode": "compiled", "max_new_tokens": 1,
        "cache_len": 768, "prefill_ladder": True}, "ladder")
    column.generates.append(ladder)
    assert pick_generate(column) is reference
    assert [row.context for row in break_even(column).rows if row.measured] == [80, 512]
    assert not [w for w in column_warnings(column) if "no decode timing" in w]
    del ladder.config["prefill_ladder"]  # an ordinary prefill-only Result is still flagged
    assert [w for w in column_warnings(column) if "no decode timing" in w]


def test_the_warm_up_cell_says_whether_the_process_compiled_afresh_or_loaded():
    """The extended table's warm-up: the case's own or the whole run's, then how its process
    got the compiled step (metrics.compiler), since the two kinds may run at different speeds;
    nothing added for a Result without the counts or one that compiled nothing."""
    from infermeter.report.tables import _warmup_cell

    fresh = {"graph_cache_misses": 2, "graph_cache_hits": 0, "tuning_benchmarks": 110}
    loaded = {"graph_cache_misses": 0, "graph_cache_bypasses": 0, "graph_cache_hits": 2}
    assert _warmup_cell({"warmup_s": 59.6, "compiler": fresh}) == \
        "59.60 s (this case; compiled afresh)"
    assert _warmup_cell({"warmup_s": 12.6, "compiler": loaded}) == \
        "12.60 s (this case; loaded from the compiler's cache)"
    assert _warmup_cell({"warmup_s": 0.2, "compiler": {"graph_cache_hits": 0}}) == \
        "0.20 s (this case)"
    run = {"run_warmup_s": 70.94, "run_warmup_parts": {"reference_s": 50.0,
                                                       "prefill_ladder_s": 20.94}}
    assert _warmup_cell(run) == "70.94 s, whole run (reference prompt 50.00 s + prefill " \
        "ladder 20.94 s)"
    assert _warmup_cell({**run, "compiler": fresh}) == "70.94 s, whole run (reference prompt " \
        "50.00 s + prefill ladder 20.94 s; compiled afresh)"
    assert _warmup_cell({"run_warmup_s": 3.0, "compiler": loaded}) == \
        "3.00 s, whole run (loaded from the compiler's cache)"
