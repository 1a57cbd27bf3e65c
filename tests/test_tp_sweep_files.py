"""benchmarks/tp_sweep.py's comm and runs files: Results naming the machine (the newer files), and
the summary reads them as it reads the bare JSON that earlier sweeps committed."""

import json
import subprocess
from pathlib import Path

import pytest

from infermeter.measure.result import Result, read_results, write_json
from tests.benchmark_scripts import load_benchmark as load

ROWS = [{"run": i, "mode": "eager", "exit_code": 0, "wall_s": 15.0 + i, "result_written": True,
         "stderr_tail": ""} for i in range(9)]
ROWS.append({"run": 9, "mode": "eager", "exit_code": None, "wall_s": 300.0,
             "result_written": False, "stderr_tail": "timed out"})
COMM = {"eager_ms_per_step": 12.98, "graph_ms_per_step": 0.81, "all_reduces_per_step": 80}


def summary_lines(folder: Path) -> list[str]:
    text = load("tp_summary").summarize(folder, "tp-gpu")
    return [line for line in text.splitlines() if "collectives" in line or "start to exit" in line]


EXPECTED = ["collectives of one llama-2-13b tp 2 decode step (80 all-reduces + 2 all-gathers): "
            "0.810 ms in a CUDA graph, 12.980 ms eager",
            "start to exit, `infermeter generate --tp 2` x 10: 9 clean (exit 0, Result written), "
            "wall 15-300 s, hung: 1"]


def test_summary_reads_the_bare_files_of_earlier_sweeps(tmp_path):
    (tmp_path / "tp-gpu-comm.json").write_text(json.dumps({"model": "llama-2-13b", "tp": 2,
                                                            **COMM}))
    (tmp_path / "tp-gpu-runs.json").write_text(json.dumps(ROWS))
    assert summary_lines(tmp_path) == EXPECTED


def test_summary_gives_the_one_shot_all_reduce_beside_nccl(tmp_path):
    comm = {"model": "llama-2-13b", "tp": 2, **COMM, "one_shot_graph_ms_per_step": 0.3}
    (tmp_path / "tp-gpu-comm.json").write_text(json.dumps(comm))
    text = load("tp_summary").summarize(tmp_path, "tp-gpu")
    assert "  with symmetric-memory one-shot all-reduces: 0.300 ms in a CUDA graph" in text
    comm = {"model": "llama-2-13b", "tp": 2, **COMM, "triton_graph_ms_per_step": 0.25,
            "triton_equals_nccl": True}
    (tmp_path / "tp-gpu-comm.json").write_text(json.dumps(comm))
    text = load("tp_summary").summarize(tmp_path, "tp-gpu")
    assert ("  with the peer kernel's all-reduces (triton): 0.250 ms in a CUDA graph, sums "
            "equal NCCL's") in text
    comm = {"model": "llama-2-13b", "tp": 2, **COMM, "one_shot_graph_error": "RuntimeError: x"}
    (tmp_path / "tp-gpu-comm.json").write_text(json.dumps(comm))
    text = load("tp_summary").summarize(tmp_path, "tp-gpu")
    assert "  with symmetric-memory one-shot all-reduces: - ms in a CUDA graph (RuntimeError: x)" \
        in text


def test_runs_and_comm_are_results_that_name_the_machine(tmp_path):
    sweep = load("tp_sweep")
    runs = sweep.runs_result(ROWS)
    assert runs.config["benchmark"] == "tp_runs" and runs.env["hostname"]
    assert (runs.metrics["clean_runs"], runs.metrics["hung_runs"]) == (9, 1)
    write_json(tmp_path / "tp-gpu-runs.json", runs)
    comm = Result("generate", {"name": "llama-2-13b"},
                  {"benchmark": "tp_comm", "model": "llama-2-13b", "tp": 2}, runs.env, COMM)
    write_json(tmp_path / "tp-gpu-comm.json", comm)
    assert [r.config["benchmark"] for r in read_results(tmp_path / "tp-gpu-runs.json")] == \
        ["tp_runs"]  # a valid Result file, which `infermeter report` lists as untimed
    assert summary_lines(tmp_path) == EXPECTED


@pytest.mark.parametrize("name", ["tp_sweep", "tp_summary"])
def test_scripts_import(name):
    assert load(name)


def test_summary_compares_each_tp2_variant_with_tp1(tmp_path):
    """decode-13b (tp 1, tp 2 with NCCL) and decode-13b-one-shot (tp 2 only, one-shot
    all-reduces): one ratio line each against decode-13b's tp 1, the target named on both.
    decode-13b-prefetch runs its own tp 1 and tp 2: its ratio is within the part, never its tp 2
    against the other part's tp 1 (an earlier summary paired them across parts)."""
    def decode(part: str, tp: int, tok_s: float, all_reduce: str | None) -> str:
        config = {"tp_sweep": part, "tp": tp, "tp_all_reduce": all_reduce}
        return json.dumps({"kind": "generate", "model": {"name": "llama-2-13b"},
                           "config": config, "metrics": {"decode_tok_per_s": tok_s,
                                                         "tpot_ms": {"p50": 1e3 / tok_s}}})
    lines = [decode("decode-13b", 1, 100.0, None), decode("decode-13b", 2, 160.0, "nccl"),
             decode("decode-13b-one-shot", 2, 180.0, "one-shot"),
             decode("decode-13b-prefetch", 1, 90.0, None),
             decode("decode-13b-prefetch", 2, 162.0, "nccl")]
    (tmp_path / "tp-gpu.jsonl").write_text("\n".join(lines) + "\n")
    text = load("tp_summary").summarize(tmp_path, "tp-gpu")
    ratios = [line for line in text.splitlines() if " / tp 1 decode = " in line]
    assert ratios == [
        "llama-2-13b [decode-13b]: tp 2 / tp 1 decode = 1.60x (target >= 1.7x)",
        "llama-2-13b [decode-13b-one-shot]: tp 2 (one-shot all-reduces) / tp 1 decode = 1.80x "
        "(target >= 1.7x)",
        "llama-2-13b [decode-13b-prefetch]: tp 2 / tp 1 decode = 1.80x (target >= 1.7x)"]


def test_one_shot_part_runs_tp2_only_with_the_flag(tmp_path, monkeypatch):
    sweep = load("tp_sweep")
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    sweep.part_decode("llama-2-13b", tmp_path / "tp.jsonl", "decode-13b-one-shot")
    (cmd,) = commands
    assert cmd[cmd.index("--tp") + 1] == "2"
    assert cmd[cmd.index("--tp-all-reduce") + 1] == "one-shot"
    sweep.part_decode("llama-2-13b", tmp_path / "tp.jsonl", "decode-13b-triton")
    assert commands[1][commands[1].index("--tp-all-reduce") + 1] == "triton"
    sweep.part_decode("llama-2-13b", tmp_path / "tp.jsonl", "decode-13b", tmp_path / "t")
    assert [c[c.index("--tp") + 1] for c in commands[2:]] == ["1", "2"]
    assert not any("--tp-all-reduce" in c for c in commands[2:])
    # only the tp 2 run is traced, into a folder of its part
    assert "--trace" not in commands[2]
    assert commands[3][commands[3].index("--trace") + 1] == str(tmp_path / "t" / "decode-13b")


def test_trace_kernels_lists_each_kernel_and_grid_per_step():
    """benchmarks/trace_kernels.py: kernels of the same name but another grid (the GEMV per
    weight shape) are rows of their own; calls and time are per traced step, most time first;
    host events are not kernels."""
    def kernel(name: str, grid: list, dur: float) -> dict:
        return {"cat": "kernel", "ph": "X", "name": name, "dur": dur, "args": {"grid": grid}}
    events = [kernel("_gemv_kernel", [1280, 1, 1], 12.0)] * 4 + \
        [kernel("_gemv_kernel", [5120, 1, 1], 26.0)] * 2 + \
        [kernel("_peer_add_norm_kernel", [1, 1, 1], 5.5)] * 8 + \
        [{"cat": "cpu_op", "ph": "X", "name": "aten::mm", "dur": 99.0}]
    rows = load("trace_kernels").kernel_table({"traceEvents": events}, steps=2)
    assert rows == [("_gemv_kernel", "[5120, 1, 1]", 1.0, 26.0),
                    ("_gemv_kernel", "[1280, 1, 1]", 2.0, 24.0),
                    ("_peer_add_norm_kernel", "[1, 1, 1]", 4.0, 22.0)]
