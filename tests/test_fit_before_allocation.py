"""Absurd sizes are refused by arithmetic before anything that scales with them is allocated:
generate plans its cases from sizes alone (cases.Rows makes the prompts only after the fit
check), and kv, copy and run refuse --batch-size / --seq-len of a billion with one error line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from infermeter.errors import InfermeterError
from infermeter.generate import cases as cases_module
from infermeter.generate import memory
from infermeter.generate.cases import plan_cases, prompt_sets
from infermeter.generate.job import run_generate
from infermeter.generate.request import build_request
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]
BILLION = 10**9
# The child's address space is capped so that a regression fails here with a MemoryError
# instead of taking the test machine's memory (the old order reached 24 GB at a billion).
CAP_BYTES = 6 * 2**30
# Python + torch imported is about 0.5 GB resident; a billion of anything is far above this.
MAX_RSS_KIB = 1_500_000


def _child(args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `infermeter ARGS` under the cap; (the process, its peak resident set in KiB)."""
    script = (
        "import resource, subprocess, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES}))\n"
        "out = subprocess.run([sys.executable, '-m', 'infermeter', *sys.argv[1:]],"
        " capture_output=True, text=True, timeout=120)\n"
        "sys.stdout.write(out.stdout)\n"
        "sys.stderr.write(out.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(out.returncode)\n")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=300)
    *lines, rss = out.stderr.strip().splitlines()
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout,
                                       "\n".join(lines)), int(rss)


@pytest.mark.parametrize("args", [
    ["generate", "--model", "debug", "--device", "cpu", "--batch-size", str(BILLION)],
    ["generate", "--model", "debug", "--device", "cpu", "--batch-size", str(BILLION),
     "--max-batch-size", "1"],
    ["generate", "--model", "debug", "--device", "cpu", "--prompt-len", str(BILLION)],
    ["copy", "--device", "cpu", "--batch-size", str(BILLION)],
    ["copy", "--device", "cpu", "--seq-len", str(BILLION)],
])
def test_a_billion_is_one_error_line_and_little_memory(args):
    out, rss_kib = _child(args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert rss_kib < MAX_RSS_KIB, f"peak resident {rss_kib} KiB"


def test_kv_sizes_a_billion_by_arithmetic():
    out, rss_kib = _child(["kv", "--model", "debug", "--batch-size", str(BILLION)])
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "1000000000" in out.stdout
    assert rss_kib < MAX_RSS_KIB


def test_run_refuses_a_billion_stage_by_stage(tmp_path):
    """A batch of a billion: each stage's own fit check refuses it, before its allocation."""
    out, rss_kib = _child(["run", "--batch-size", str(BILLION), "--out", str(tmp_path / "out")])
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert any("copy stage failed" in line for line in errors), out.stderr
    assert any("generate stage failed" in line for line in errors), out.stderr
    assert "Traceback" not in out.stderr
    assert rss_kib < MAX_RSS_KIB


def test_run_refuses_a_billion_tokens_before_any_stage(tmp_path):
    """A cache of a billion tokens is past the model's context: one line before the first
    stage, no results folder."""
    out, rss_kib = _child(["run", "--seq-len", str(BILLION), "--out", str(tmp_path / "out")])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"infermeter: error: --seq-len {BILLION}: the cache holds a prompt and new tokens, so it "
        "takes 2 to 256 tokens (debug's context)"]
    assert not (tmp_path / "out").exists()
    assert rss_kib < MAX_RSS_KIB


def _no_prompts(*args, **kwargs):
    raise AssertionError("prompts were made before the fit check")


def test_generate_refuses_before_any_prompt_or_weight_exists(monkeypatch):
    """The refusal comes from sizes: making prompts, weights or peaks would raise here."""
    import infermeter.engine.checkpoint.load as checkpoint
    from infermeter.measure import roofline

    monkeypatch.setattr(cases_module, "random_prompts", _no_prompts)
    monkeypatch.setattr(checkpoint, "load_weights", _no_prompts)
    monkeypatch.setattr(roofline, "measure_roofline", _no_prompts)
    for changes in ({}, {"prompt_lens": (8,)}, {"contexts": (100,)}, {"max_batch_size": 1}):
        request = build_request(source="random:debug", device="cpu", roofline=True,
                                  batch_sizes=(BILLION,), **changes)
        with pytest.raises(InfermeterError, match="does not fit"):
            run_generate(request, {})


def test_planning_reads_sizes_only(monkeypatch):
    """A trillion rows of 8 random ids: planned, grouped and checked without making one row."""
    monkeypatch.setattr(cases_module, "random_prompts", _no_prompts)
    trillion = 10**12
    sets = prompt_sets((trillion,), (8,), (), DEBUG.vocab_size, 0, (1, 2))
    (case,) = plan_cases(DEBUG, sets, ("eager",), 4, max_batch=1000)
    assert case.prompt_set.batch_size == trillion and case.prompt_set.prompt_len == 8
    assert case.prompt_set.prompt_tokens == 8 * trillion
    assert case.largest_group == 1000
    with pytest.raises(InfermeterError) as err:
        memory.check_cases_fit(DEBUG, [case], "fp32", "fp32", torch.device("cpu"),
                               outputs_per_row=4)
    # the prompts as int64 on the device, the ids (prompts + 4 outputs a row) in host lists
    assert "prompt ids 58.2 TiB" in str(err.value)
    assert "token ids in host lists 87.3 TiB" in str(err.value)


def test_the_host_lists_are_checked_apart_on_a_gpu(monkeypatch):
    """On a GPU the token ids in host lists are weighed against host memory, not the GPU's."""
    sets = prompt_sets((1000,), (8,), (), DEBUG.vocab_size, 0, (1, 2))
    cases = plan_cases(DEBUG, sets, ("eager",), 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    monkeypatch.setattr(memory, "host_available", lambda: 1000 * (8 + 50) * 8 - 1)
    with pytest.raises(InfermeterError, match="token ids in host lists .* available in host"):
        memory.check_cases_fit(DEBUG, cases, "fp32", "fp32", torch.device("cuda", 0),
                               outputs_per_row=50)
    monkeypatch.setattr(memory, "host_available", lambda: 1000 * (8 + 50) * 8)
    memory.check_cases_fit(DEBUG, cases, "fp32", "fp32", torch.device("cuda", 0),
                           outputs_per_row=50)


def test_rows_are_made_once_on_first_read():
    sets = prompt_sets((3,), (5,), (), DEBUG.vocab_size, 0, ())
    rows = sets[0].prompts
    assert len(rows) == 3 and rows[0] == cases_module.random_prompts(3, 5, DEBUG.vocab_size, 0)[0]
    assert rows[1] is rows[1]
    assert list(rows) == list(cases_module.random_prompts(3, 5, DEBUG.vocab_size, 0))
    (fixed,) = prompt_sets((4,), (), (), DEBUG.vocab_size, 0, (1, 2, 3))
    assert list(fixed.prompts) == [(1, 2, 3)] * 4 and fixed.prompt_len == 3
