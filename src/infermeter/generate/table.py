"""What `infermeter generate` prints: the outputs, one table row per case, the warnings, and a
progress bar on stderr while it runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from infermeter.measure.clocks import sm_span
from infermeter.measure.compiler import graphs_built
from infermeter.textable import render_table
from infermeter.units import format_bytes

HEADER = ["batch", "prompt", "KV tokens", "mode", "TTFT ms", "TTFT floor ms", "TPOT p50 ms",
          "TPOT p90 ms", "decode tok/s", "tok/s (seed)", "MBU %", "prefill MBU %", "MFU %",
          "warnings"]
# Shown before "warnings" when some Result is a mixture-of-experts model: the batch sweep's
# expert union and the bytes a decode step reads with it (a dense table keeps HEADER).
MOE_HEADER = ["experts/layer step", "uniform", "bytes/step"]
MOE_LEGEND = ("experts/layer step: the distinct experts a decode step's tokens were routed to, "
              "per MoE layer, counted (mean over the steps; '-' where not counted, as in the hf "
              "mode); uniform: E(1-(1-k/E)^B), the union uniform routing would give; bytes/step: "
              "what a decode step must read with the counted experts, which MBU divides")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def is_moe(result: Any) -> bool:
    return bool(result.model.get("n_experts"))


def moe_cells(result: Any) -> list[str]:
    """MOE_HEADER's cells: experts counted a step, the uniform-routing union, bytes a step."""
    m = result.metrics
    nbytes = m.get("bytes_per_decode_step")
    return [_num(m.get("moe_experts_per_step"), ".2f"), _num(m.get("moe_experts_uniform"), ".2f"),
            "-" if nbytes is None else format_bytes(nbytes)]


def case_row(result: Any, moe: bool = False) -> list[str]:
    """One case's cells (HEADER; with moe, MOE_HEADER's before the warnings)."""
    m, cfg = result.metrics, result.config
    prompt = cfg["prompt_len"] if cfg["prompt_len"] is not None else "mixed"
    span = m.get("decode_context_range")
    kv = f"{span[0]}-{span[1]}" if span else "-"
    if cfg.get("context"):
        prompt = f"{prompt} (context)"
    tpot = m.get("tpot_ms") or {}
    floor = _num(m.get("ttft_floor_ms"), ".2f")
    if m.get("prefill_bound"):  # which roofline sets it: judge by prefill MBU, or by MFU
        floor += f" ({m['prefill_bound']})"
    return [str(cfg["batch_size"]), str(prompt), kv, cfg["mode"], _num(m.get("ttft_ms"), ".2f"),
            floor, _num(tpot.get("p50"), ".3f"), _num(tpot.get("p90"), ".3f"),
            _num(m.get("decode_tok_per_s"), ",.1f"), _num(m.get("token_generation_speed"), ",.1f"),
            _num(m.get("mbu_pct"), ".1f"), _num(m.get("prefill_mbu_pct"), ".1f"),
            _num(m.get("mfu_pct"), ".1f"), *(moe_cells(result) if moe else []),
            "out of memory" if m.get("oom") else str(len(result.warnings) or "")]


def headline(results: Sequence[Any]) -> str:
    first = results[0]
    m, cfg = first.metrics, first.config
    tp = f" x {cfg['tp']} (tensor parallel)" if (cfg.get("tp") or 1) > 1 else ""
    line = (f"{first.model['name']} ({cfg.get('weights', 'random')} weights, {cfg['dtype']}, KV "
            f"{cfg['kv_dtype']}) on {first.env.get('device_name')}{tp}, {cfg['repeats']} timed "
            f"runs per case after {cfg['warmup']} untimed")
    if m.get("hbm_gbps_measured"):
        line += (f"; measured here: {m['hbm_gbps_measured']:,.0f} GB/s memory copy "
                 f"({format_bytes(m['roofline_copy_bytes'])}), "
                 f"{m['matmul_tflops_measured']:,.3g} TFLOP/s matmul "
                 f"({m['roofline_matmul_dtype']} {m['roofline_matmul_n']}^3)")
    return line + clock_note(results)


def clock_note(results: Sequence[Any]) -> str:
    """The SM clocks every case's timed runs ended at (metrics.gpu_clocks), for the headline:
    '' where no Result has them (the CPU, no NVML)."""
    read = [r.metrics["gpu_clocks"] for r in results if r.metrics.get("gpu_clocks")]
    clocks = [mhz for c in read for mhz in c["sm_mhz"]]
    if not clocks:
        return ""
    return (f"; SM clock {sm_span(clocks)} MHz (of {read[0]['sm_max_mhz']:,}) as the timed "
            "runs ended")


def render_generate(results: Sequence[Any]) -> str:
    """Headline, the table, then every warning named by its row."""
    if not results:
        return "no cases were run"
    moe = any(is_moe(r) for r in results)
    header = [*HEADER[:-1], *MOE_HEADER, HEADER[-1]] if moe else HEADER
    lines = [headline(results), render_table(header, [case_row(r, moe) for r in results])]
    for index, result in enumerate(results, start=1):
        cfg = result.config
        where = f"row {index} (batch {cfg['batch_size']}, {cfg['mode']})"
        lines += [f"warning: {where}: {note}" for note in result.warnings]
    lines += crossover_lines(results)
    lines += compiler_lines(results)
    lines.append("TTFT: prefill to first token (sampled); TTFT floor: the larger of the prefill's "
                 "bytes (weights once, K/V written) at the HBM bandwidth and its FLOPs at the "
                 "matmul peak; TPOT: one decode step; decode tok/s: batch x steps / decode time "
                 "(prefill excluded); tok/s (seed): all new tokens / whole run; MBU (decode), "
                 "prefill MBU, MFU (prefill): against the peaks measured above (docs/generate.md, "
                 "\"Timing\")")
    if moe:
        lines.append(MOE_LEGEND)
    return "\n".join(lines)


def crossover_lines(results: Sequence[Any]) -> list[str]:
    """Per batch size, the prompt length where the prefill turns compute-bound on these peaks."""
    found = {r.config["batch_size"]: r.metrics.get("prefill_crossover_len") for r in results}
    return [f"prefill of batch {batch} turns compute-bound at {length:,} prompt tokens on the "
            "peaks measured here (shorter prompts: judge by prefill MBU; longer: by MFU)"
            for batch, length in found.items() if length]


def compiler_line(compiler: dict[str, int]) -> str | None:
    """What the compiler did over a case's warm-up (metrics.compiler, measure/compiler.py), in
    words: 'compiled 2 graphs afresh, timed 110 kernel configs'; None where it did nothing (an
    eager case, or one whose compiled step an earlier case made)."""
    (made, loaded), timed = graphs_built(compiler), compiler.get("tuning_benchmarks", 0)
    if not (made or loaded or timed):
        return None
    done = [f"compiled {made} graph{'s' * (made != 1)} afresh"] if made else []
    if loaded:
        done.append(f"loaded {loaded} graph{'s' * (loaded != 1)} from the compiler's cache")
    done.append(f"timed {timed:,} kernel config{'s' * (timed != 1)}" if timed
                else "timed no kernel config")
    return ", ".join(done)


def compiler_lines(results: Sequence[Any]) -> list[str]:
    """Per case that compiled, what its warm-up compiled, loaded and tuned, then why it is
    said: a process compiling afresh and one reloading from the cache may run one step at
    different speeds, so two figures compare only from processes of one kind."""
    lines = [f"compiler, row {index}: {line}" for index, result in enumerate(results, start=1)
             if (line := compiler_line(result.metrics.get("compiler") or {}))]
    if lines:
        lines.append("compiler: a process that compiles afresh and one that reloads from the "
                     "cache may run one step at different speeds; compare runs of one kind "
                     "(docs/generate.md, \"Comparing two runs\")")
    return lines


def render_outputs(result: Any, texts: Sequence[str]) -> str:
    """The first case's outputs, one line per sequence (text, or ids without a tokenizer)."""
    ids = result.output_token_ids or []
    return "\n".join(f"[{i}] {text!r}" if text else f"[{i}] ids {row}"
                     for i, (row, text) in enumerate(zip(ids, list(texts) or [""] * len(ids))))


class ProgressBar:
    """A rich progress bar on stderr; run_generation calls start(total), then advance(label)."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.task = bar, None

    def start(self, total: int) -> None:
        self.task = self.bar.add_task("", total=total)

    def advance(self, label: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=1, description=label)


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressBar | None]:
    """The bar when enabled, rich is installed and stderr is a terminal; else None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:
        yield None
        return
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield ProgressBar(bar)
