"""`infermeter run` on the CPU: the debug preset end to end (kv, copy, generate, offload,
report), the reference setting's plan, Ctrl-C keeping finished stages, and failing stages."""

import json
import os
import signal
import subprocess
import sys

import pytest

from infermeter.cli import main
from infermeter.measure.result import REQUIRED_FIELDS
from infermeter.report.tables import REFERENCE_ROWS
from infermeter.run import stages
from tests.cli_in_process import run_cli as in_process

CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU default, even on a GPU machine


def run_cli(*args, cwd=None):
    """`infermeter run ARGS` in this process, stderr into stdout (tests/cli_in_process.py);
    callers take the cpu_only fixture too (CUDA_VISIBLE_DEVICES cannot hide a GPU that torch
    has already seen)."""
    return in_process("run", *args, cwd=cwd, env={"CUDA_VISIBLE_DEVICES": ""}, merge_stderr=True)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def cpu_only(monkeypatch):
    """In-process runs take the CPU default wherever the tests run."""
    monkeypatch.setattr("infermeter.copy.job.gpu_available", lambda: False)


def test_default_run_on_cpu_writes_results_and_report(tmp_path, cpu_only):
    done = run_cli(cwd=tmp_path)  # no --out: ./infermeter-results/<UTC timestamp>
    assert done.returncode == 0, done.stdout
    first = done.stdout.splitlines()[0]
    assert "CPU" in first and "debug" in first
    (folder,) = (tmp_path / "infermeter-results").iterdir()
    results = read_jsonl(folder / "results.jsonl")
    # the reference generate Result, then the prefill ladder's (debug: 128 and its 255-token
    # context less the one new token), then the offload stage's
    assert [r["kind"] for r in results] == ["kv", "copy"] + ["generate"] * 3 + ["offload"]
    ladder = results[3:5]
    assert [r["config"]["prompt_len"] for r in ladder] == [128, 255]
    assert all(r["config"]["prefill_ladder"] and r["config"]["max_new_tokens"] == 1
               and r["metrics"]["ttft_ms"] > 0 for r in ladder)
    assert "prefill_ladder" not in results[2]["config"]
    # the stage's whole warm-up (reference prompt + ladder) on its reference Result, apart from
    # the timed figures, in the output and the report
    warmup = results[2]["metrics"]
    cases = results[2:5]
    assert warmup["run_warmup_s"] == pytest.approx(sum(r["metrics"]["warmup_s"] for r in cases))
    assert warmup["run_warmup_parts"] == pytest.approx({
        "reference_s": results[2]["metrics"]["warmup_s"],
        "prefill_ladder_s": sum(r["metrics"]["warmup_s"] for r in ladder),
        "untimed_runs_s": sum(r["metrics"]["warmup_runs_s"] for r in cases)})
    assert warmup["run_warmup_s"] > 0 and not any("run_warmup_s" in r["metrics"] for r in ladder)
    line = next(s for s in done.stdout.splitlines() if "generate warm-up" in s)
    assert f"{warmup['run_warmup_s']:.1f} s (reference prompt" in line
    for result in results:
        assert set(REQUIRED_FIELDS) <= set(result)
    assert results[0]["metrics"]["kv_cache_bytes_allocated"] == \
        results[0]["metrics"]["kv_cache_bytes"]
    generate = results[2]
    assert generate["metrics"]["total_tokens"] == 54  # 10 prompt + 54 new = the 64-token cache
    assert generate["config"]["mode"] == "eager"
    assert results[1]["config"]["device"] == "cpu"
    markdown = (folder / "report.md").read_text()
    assert all(row in markdown for row in REFERENCE_ROWS)
    # the notes name the Results as the folder holds them, valid wherever it is moved
    assert "tokens from results.jsonl:3" in markdown and str(folder) not in markdown
    assert f"| Warm-up (not timed) | {warmup['run_warmup_s']:,.2f} s, whole run (reference " \
        "prompt" in markdown
    # the copy stage's host-memory figures, named so (a CPU has no pinned case), and why no
    # break-even, where the note had said the column lacked what it had
    moving = next(line for line in done.stdout.splitlines() if "Moving Bandwidth" in line)
    assert "GB/s" in moving and "(pageable" in moving, done.stdout
    assert "| Moving Time (htod, dtoh) | -" not in markdown
    assert "its copies are from pageable host memory only" in markdown
    assert "no column has both" not in markdown
    assert (folder / "report.html").read_text().rstrip().endswith("</html>")
    assert "Reference table" in done.stdout and not leftovers(folder)
    # offload: suffixes = the prompt and the cache, prefixes = 64 and (not 64 x 4) the 188 that
    # fit with the longest suffix and 4 checked tokens in debug's 256 positions
    offload = results[5]
    assert (offload["config"]["prefix_lens"], offload["config"]["suffix_lens"]) == (
        [64, 188], [10, 64])
    cases = offload["metrics"]["cases"]
    assert [(c["suffix_len"], c["prefix_len"]) for c in cases] == [
        (s, p) for s in (10, 64) for p in (64, 188)]
    assert all(min(c["ttft_ms"].values()) > 0 for c in cases) and offload["metrics"]["same_tokens"]
    # and from a paged host copy in the copy stage's 16-token blocks
    assert {(r["block_size"], r["way"]) for r in offload["metrics"]["paged_break_even"]} == {
        (16, "serial"), (16, "layerwise")}
    assert "## Reload vs recompute, measured (TTFT)" in markdown
    assert (folder / "plots" / "offload-cpu-debug-batch-1.png").is_file()


@pytest.fixture
def without_offload(monkeypatch):
    """The stages less offload, for tests about something else (the default run covers it)."""
    monkeypatch.setattr(stages, "STAGES", tuple(s for s in stages.STAGES if s[0] != "offload"))


def test_out_is_respected_never_mixes_runs_and_trace_writes_the_breakdown(
        tmp_path, cpu_only, without_offload, capsys):
    """--out (a folder not made yet) holds the run, and a second run there is refused; the
    first run's --trace writes a copy and a generate trace and the breakdown (one run serves
    both checks)."""
    out, traces = tmp_path / "a" / "b", tmp_path / "traces"
    assert main(["run", "--out", str(out), "--trace", str(traces)]) == 0
    assert (out / "results.jsonl").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    assert main(["run", "--out", str(out)]) == 2  # a second run there would mix two runs
    assert "already holds results.jsonl" in capsys.readouterr().err
    for kind in ("copy", "generate"):
        trace = json.loads((traces / kind / "trace-rank0.json").read_text())
        assert trace["traceEvents"], kind  # a loadable Chrome trace with events in it
    results = read_jsonl(out / "results.jsonl")
    copy, generate = results[1]["metrics"], results[2]["metrics"]
    assert copy["breakdown"]["trace"].endswith("copy/trace-rank0.json")
    step = generate["breakdown"]
    assert step["steps_traced"] >= 1 and step["step_ms"] > 0
    assert {c["name"] for c in step["categories"]} >= {"matmul qkv", "matmul lm_head"}


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored when the command starts, as in a job a shell started with `&` (or under
    nohup ... &): the CLI must take Ctrl-C back itself."""
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, saved)


def _interrupting(name):
    """The stage list with stage `name` replaced by a real Ctrl-C (SIGINT to this process)."""
    def interrupt(setting, env):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not interrupt")

    return tuple((n, what, interrupt if n == name else stage)
                 for n, what, stage in stages.STAGES)


def test_ctrl_c_after_copy_keeps_finished_stages(tmp_path, cpu_only, monkeypatch, capsys,
                                                 sigint_ignored):
    monkeypatch.setattr(stages, "STAGES", _interrupting("generate"))
    assert main(["run", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: generate, offload did not run; kept kv, copy" in err
    assert [r["kind"] for r in read_jsonl(tmp_path / "results.jsonl")] == ["kv", "copy"]
    markdown = (tmp_path / "report.md").read_text()  # made from what finished, complete
    assert all(row in markdown for row in REFERENCE_ROWS)
    assert not leftovers(tmp_path)


def test_ctrl_c_in_the_first_stage_leaves_no_files(tmp_path, cpu_only, monkeypatch, capsys,
                                                   sigint_ignored):
    monkeypatch.setattr(stages, "STAGES", _interrupting("kv"))
    assert main(["run", "--out", str(tmp_path)]) == 130
    assert "kv, copy, generate, offload did not run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# A child that inherits an ignored SIGINT; its generate stage sends itself SIGINT and exits 99
# if that did not interrupt it.
CHILD_INTERRUPTED_IN_GENERATE = """
import os, signal, sys
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "the child must start with SIG_IGN"
from infermeter.cli import main
from infermeter.run import stages
from tests.cli_in_process import run_cli as in_process

def interrupt(setting, env):
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(99)

stages.STAGES = tuple((n, what, interrupt if n == "generate" else stage)
                      for n, what, stage in stages.STAGES)
sys.exit(main(["run", "--out", sys.argv[1]]))
"""


def test_ctrl_c_reaches_a_run_started_with_sigint_ignored(tmp_path):
    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    done = subprocess.run([sys.executable, "-c", CHILD_INTERRUPTED_IN_GENERATE, str(tmp_path)],
                          env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, preexec_fn=ignore_sigint)
    assert done.returncode == 130, done.stdout
    assert "interrupted: generate, offload did not run; kept kv, copy" in done.stdout
    assert "Traceback" not in done.stdout
    assert [r["kind"] for r in read_jsonl(tmp_path / "results.jsonl")] == ["kv", "copy"]
    assert not leftovers(tmp_path)


def test_a_failing_stage_is_one_line_and_the_others_still_run(tmp_path, cpu_only, monkeypatch):
    """A stage's InfermeterError (generate's and offload's here, planted: the flags' checks
    now refuse up front what used to fail them, such as a cache past the model's context) is
    one line; the stages around it still run and the report covers what they measured."""
    from infermeter.errors import InfermeterError
    from infermeter.run import stages

    def failing(what):
        def stage(setting, env):
            raise InfermeterError(f"planted: {what}")
        return stage

    planted = {"generate": failing("no room"), "offload": failing("no case fits")}
    monkeypatch.setattr(stages, "STAGES", tuple(
        (name, what, planted.get(name, stage)) for name, what, stage in stages.STAGES))
    done = run_cli("--out", str(tmp_path))
    assert done.returncode == 2
    errors = [line for line in done.stdout.splitlines() if "error" in line]
    assert len(errors) == 2, done.stdout  # one line each: generate's, offload's
    assert "generate stage failed: planted: no room" in errors[0]
    assert "offload stage failed: planted: no case fits" in errors[1]
    assert "Traceback" not in done.stdout
    assert [r["kind"] for r in read_jsonl(tmp_path / "results.jsonl")] == ["kv", "copy"]
    assert (tmp_path / "report.md").is_file() and not leftovers(tmp_path)


def test_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path, cpu_only):
    out = tmp_path / "out"
    done = run_cli("--checkpoint", str(tmp_path / "nonexistent"), "--out", str(out))
    assert done.returncode == 2
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("infermeter: error:")
    assert not out.exists()


def _broken_checkpoint(fmt, folder):
    """The debug preset's checkpoint in `fmt`, intact and then with one tensor missing (hf,
    gguf) or of the wrong shape (meta, its second shard): (its path, what the error names)."""
    import torch

    from infermeter.engine.checkpoint.load import save_checkpoint
    from infermeter.engine.model import build_model
    from infermeter.specs.presets import PRESETS

    model = build_model(PRESETS["debug"])
    if fmt == "gguf":
        from tests.gguf_files import write_gguf

        path = write_gguf(model, folder / "debug.gguf")
        intact = stages.plan_setting(None, str(path), None, None, None, gpu=False)
        assert intact.checkpoint == str(path)
        return write_gguf(model, path, drop=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight"
    save_checkpoint(model, folder, fmt, n_shards=2 if fmt == "meta" else 1)
    assert stages.plan_setting(None, str(folder), None, None, None, gpu=False).checkpoint
    if fmt == "hf":
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, folder / "model.safetensors")
        return folder, "missing tensor model.layers.1.mlp.up_proj.weight"
    path = folder / "consolidated.01.pth"
    state = torch.load(path, weights_only=True)
    state["layers.0.attention.wk.weight"] = state["layers.0.attention.wk.weight"][:8].clone()
    torch.save(state, path)
    return folder, "tensor layers.0.attention.wk.weight has shape [8, 64]"


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_a_checkpoint_missing_or_misshaping_a_tensor_is_one_line_and_writes_nothing(
        tmp_path, cpu_only, fmt):
    """It ran kv and copy into the results folder, then generate failed loading the weights.
    The checkpoint's names and shapes are checked before the first stage now."""
    checkpoint, error = _broken_checkpoint(fmt, tmp_path)
    out = tmp_path / "out"
    done = run_cli("--checkpoint", str(checkpoint), "--out", str(out))
    assert done.returncode == 2, done.stdout
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("infermeter: error: ")
    assert error in done.stdout and not out.exists()


def test_an_out_that_is_a_file_is_named_so(tmp_path, cpu_only):
    """It said "cannot create the results folder ([Errno 17] File exists: ...)"."""
    taken = tmp_path / "results"
    taken.write_text("mine")
    done = run_cli("--out", str(taken))
    assert done.returncode == 2 and taken.read_text() == "mine"
    assert done.stdout.splitlines() == [
        f"infermeter: error: {taken}: a file; --out names the results folder"]


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_a_dtype_the_engine_does_not_run_is_one_line_and_writes_nothing(tmp_path, cpu_only,
                                                                       dtype):
    """It printed the banner, then every stage that runs the engine failed on its own line."""
    out = tmp_path / "out"
    done = run_cli("--dtype", dtype, "--out", str(out))
    assert done.returncode == 2
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("infermeter: error: dtype ")
    assert "is not supported by the engine yet" in done.stdout and not out.exists()


GIB = 2**30


def test_prefill_ladder_on_a_gpu_runs_to_the_longest_prompt_that_fits():
    from infermeter.specs.loaders import resolve_model

    spec = resolve_model("llama-2-7b")  # 4,096 positions; 12.6 GiB of fp16 weights
    # ample memory: the rungs below its context, then the context less the one new token
    assert stages.prefill_ladder(spec, "float16", 80, 141 * GIB, on_gpu=True) == (512, 2048, 4095)
    # 16 GiB: the memory, not the context, ends the ladder, between rungs
    longest = stages.longest_prompt(spec, "float16", 16 * GIB)
    assert 2048 < longest < 4095
    assert stages.prefill_ladder(spec, "float16", 80, 16 * GIB, True) == (512, 2048, longest)
    # too little for the weights: no ladder at all
    assert stages.prefill_ladder(spec, "float16", 80, 10 * GIB, True) == ()
    # a longer reference prompt drops the rungs it already measures
    assert stages.prefill_ladder(spec, "float16", 2048, 141 * GIB, True) == (4095,)


def test_prefill_ladder_stops_at_the_reports_longest_context():
    from infermeter.specs.loaders import resolve_model

    spec = resolve_model("llama-3.1-8b")  # 131,072 positions
    assert stages.prefill_ladder(spec, "bfloat16", 80, 141 * GIB, True) == (
        512, 2048, 8192, stages.LADDER_LONGEST)
    assert stages.prefill_ladder(spec, "bfloat16", 80, None, True)[-1] == stages.LADDER_LONGEST


def test_longest_prompt_fits_the_memory_it_was_given():
    from infermeter.generate.memory import case_memory
    from infermeter.specs.loaders import resolve_model
    from infermeter.specs.sizes import cache_length

    spec = resolve_model("llama-3.1-8b")
    free = 40 * GIB
    n = stages.longest_prompt(spec, "bfloat16", free)

    def need(tokens):
        cache = cache_length(spec, tokens, 1, None)
        return sum(case_memory(spec, 1, tokens, cache, "bfloat16", "bfloat16", "eager").values())

    assert need(n) <= free * stages.LADDER_MEMORY_SHARE < need(n + 1)


def test_prefill_ladder_on_the_cpu_is_short():
    from infermeter.specs.loaders import resolve_model

    debug = resolve_model("debug")  # 256 positions
    assert stages.prefill_ladder(debug, "float32", 10, 64 * GIB, on_gpu=False) == (128, 255)
    big = resolve_model("llama-2-7b")  # a big --model on the CPU stays at a few hundred tokens
    assert stages.prefill_ladder(big, "float32", 80, 64 * GIB, on_gpu=False) == (
        128, stages.CPU_LADDER_LONGEST)


def test_reference_setting_plan():
    setting = stages.plan_setting(None, None, None, None, None, gpu=True)
    assert setting.reference and setting.spec.name == "llama-2-7b"
    assert (setting.batch, setting.seq_len, setting.dtype) == (1, 512, "float16")
    assert (setting.prompt_len, setting.new_tokens) == (80, 432)  # the seed's 432 in 512
    gen = stages.generate_request(setting)
    assert gen.modes == ("compiled",) and gen.max_seq_len == 512 and gen.prompt_lens == (80,)
    assert gen.source == "random:llama-2-7b" and not gen.until_eos
    copy = stages.copy_request(setting)
    assert copy.hosts == ("seed", "pinned") and copy.device == "cuda"
    assert copy.layouts == ("engine", "contiguous", "paged") and copy.block_tokens == (16,)


def test_overrides_leave_the_reference_setting():
    setting = stages.plan_setting("llama-3.1-8b", None, 8, 4096, "bf16", gpu=True)
    assert not setting.reference
    assert (setting.batch, setting.seq_len, setting.dtype) == (8, 4096, "bfloat16")
    assert (setting.prompt_len, setting.new_tokens) == (4096 - 432, 432)
    cpu = stages.plan_setting(None, None, None, None, None, gpu=False)
    assert (cpu.spec.name, cpu.device, cpu.seq_len, cpu.reference) == ("debug", "cpu", 64, False)


def test_the_default_cache_fits_a_small_model_s_context():
    """On a GPU the default cache is the reference's 512 tokens; a model of a shorter context
    (debug's 256) gets its context instead of a refusal naming a --seq-len nobody gave. A
    --seq-len given past the context is still refused, before any stage."""
    from infermeter.errors import InfermeterError

    small = stages.plan_setting("debug", None, None, None, None, gpu=True)
    assert (small.seq_len, small.reference) == (256, False)
    with pytest.raises(InfermeterError, match="--seq-len 512: .* 2 to 256 tokens"):
        stages.plan_setting("debug", None, None, 512, None, gpu=True)


def test_offload_stage_lengths_come_from_the_setting():
    from infermeter.errors import InfermeterError
    from infermeter.specs.loaders import resolve_model

    reference = stages.plan_setting(None, None, None, None, None, gpu=True)
    request = stages.offload_request(reference, 141 * GIB)
    # llama-2-7b's 4,096 positions: the 8,192 rung becomes 4,096 - 512 - 4 checked tokens
    assert (request.prefix_lens, request.suffix_lens) == ((512, 2048, 3580), (80, 512))
    assert (request.source, request.batch_size, request.device, request.dtype) == (
        "random:llama-2-7b", 1, "cuda", "float16")
    assert request.block_sizes == stages.COPY_BLOCK_TOKENS == (16,)
    long = resolve_model("llama-3.1-8b")
    assert stages.offload_lengths(long, "bfloat16", 512, 80, 141 * GIB, True) == (
        (512, 2048, 8192), (80, 512))
    # too little memory for the weights: not one case, one error line
    with pytest.raises(InfermeterError, match="no reload-vs-recompute case fits"):
        stages.offload_lengths(long, "bfloat16", 512, 80, 10 * GIB, True)
    debug = resolve_model("debug")
    assert stages.offload_lengths(debug, "float32", 64, 10, None, False) == ((64, 188), (10, 64))
