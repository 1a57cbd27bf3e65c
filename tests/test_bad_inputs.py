"""Bad input on the command line: one `error:` line on stderr, a non-zero exit, no traceback,
nothing written. Each case here once ended otherwise (a traceback, exit 0, a wrong file)."""

import json

import pytest

from tests import published_configs as published
from tests.cli_in_process import run_cli


def run(*args, cwd=None):
    """The CLI in this process, answering as `python -m infermeter` (tests/cli_in_process.py)."""
    return run_cli(*args, cwd=cwd)


def assert_one_error_line(out, message):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], out.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in out.stderr


def test_a_config_with_zero_heads_is_one_line_naming_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(published.LLAMA_31_8B, num_attention_heads=0)))
    out = run("kv", "--model", str(path), "--output", str(tmp_path / "kv.jsonl"))
    assert_one_error_line(out, f"{path}: field 'num_attention_heads' must be a positive integer")
    assert out.stdout == "" and not (tmp_path / "kv.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    # ran greedy and recorded temperature -1.0 with greedy true
    (("--temperature", "-1"), "argument --temperature: '-1' must be >= 0 (0: greedy decoding)"),
    # sampled, then failed writing the Result's JSON with a traceback
    (("--temperature", "nan"), "argument --temperature: 'nan' is not a finite number"),
    (("--temperature", "inf"), "argument --temperature: 'inf' is not a finite number"),
    (("--temperature", "0.7", "--top-p", "1.5"), "argument --top-p: '1.5' must be in (0, 1]"),
    (("--temperature", "0.7", "--top-p", "0"), "argument --top-p: '0' must be in (0, 1]"),
    # ran greedy, ignoring the nucleus threshold it recorded
    (("--top-p", "0.9"), "--top-p 0.9 applies to sampling: give --temperature > 0 too"),
    # ran and measured, ignoring the memory it was given
    (("--gpu-memory", "80GiB"), "--gpu-memory 80GiB sizes the --dry-run plan: give --dry-run "
     "too"),
    # sampled, though --greedy asked for argmax decoding
    (("--greedy", "--temperature", "0.7"), "--greedy and --temperature 0.7 ask for two ways of "
     "decoding: give one"),
    # ran the fixed-id prompt, formatting nothing
    (("--chat-format", "llama2"), "--chat-format llama2 formats --dialogs: give --dialogs FILE "
     "too"),
])
def test_generate_refuses_sampling_settings_that_mean_nothing(args, message):
    out = run("generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "2", *args)
    assert_one_error_line(out, message)
    assert out.stdout == ""


@pytest.mark.parametrize("command", [("generate", "--max-new-tokens", "2"),
                                     ("offload", "--prefix-len", "8", "--suffix-len", "4")])
@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_a_seed_torch_cannot_take_is_one_line(command, seed):
    """2^64 ended in torch's 'Overflow when unpacking long long' traceback."""
    out = run(command[0], "--model", "debug", "--device", "cpu", *command[1:], f"--seed={seed}")
    assert_one_error_line(out, f"argument --seed: '{seed}' must be from 0 to 2^63 - 1")
    assert out.stdout == ""


@pytest.mark.parametrize("command, runner", [
    (["copy", "--device", "cpu"], "infermeter.copy.job.run_copy"),
    (["generate", "--device", "cpu"], "infermeter.generate.job.run_generate"),
])
def test_an_output_that_cannot_be_written_fails_before_measuring(tmp_path, monkeypatch, capsys,
                                                                  command, runner):
    """The output folder was checked only when the Results were written, after the timing."""
    from infermeter.cli import main

    def measured(*args, **kwargs):
        raise AssertionError("measured before checking --output")

    monkeypatch.setattr(runner, measured)
    for output, message in ((tmp_path / "missing" / "r.jsonl", "does not exist"),
                            (tmp_path, "a folder; --output names a JSONL file")):
        assert main([*command, "--model", "debug", "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(output) in err[0]


@pytest.mark.parametrize("args, message", [
    # said "argument --gpu-memory: expected one argument", as if the value were missing
    (("--gpu-memory", "-5GiB"), "cannot read size '-5GiB'"),
    (("--gpu-memory", "80GiB", "--reserve", "-1%"),
     "reserve '-1%' must be at least 0% and below 100%"),
])
def test_a_negative_size_is_read_as_a_value(args, message):
    out = run("kv", *args)
    assert_one_error_line(out, message)
    assert out.stdout == ""


@pytest.mark.parametrize("command, runner", [
    (["kv"], "infermeter.kv.job.kv_results"),
    (["copy", "--device", "cpu"], "infermeter.copy.job.run_copy"),
    (["generate", "--device", "cpu"], "infermeter.generate.job.run_generate"),
])
def test_an_output_results_cannot_be_appended_to_fails_before_measuring(
        tmp_path, monkeypatch, capsys, command, runner):
    """A binary file, a file of other text, and a folder that takes no new file were found only
    when the Results were appended, after the timing (the Results lost, or mixed into the
    other file's text); a file of Results lines takes more, untouched until the end."""
    import tempfile

    from infermeter.cli import main

    def measured(*args, **kwargs):
        raise AssertionError("measured before checking --output")

    monkeypatch.setattr(runner, measured)
    binary, notes, results = (tmp_path / name for name in ("b.jsonl", "notes.md", "r.jsonl"))
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    notes.write_text("# notes\nnot results\n")
    results.write_text('{"kind": "kv"}\n\n{"kind": "copy"}\n')
    for output, message in ((binary, "cannot append Results to it"),
                            (notes, "line 1 is not a JSON object")):
        before = output.read_bytes()
        assert main([*command, "--model", "debug", "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(output) in err[0], err
        assert output.read_bytes() == before
    with pytest.raises(AssertionError, match="measured before checking"):  # passed the checks
        main([*command, "--model", "debug", "--output", str(results)])
    capsys.readouterr()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert main([*command, "--model", "debug", "--output", str(tmp_path / "new.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"infermeter: error: {tmp_path / 'new.jsonl'}: cannot write in folder "
                   f"{tmp_path} (Permission denied)"]


@pytest.mark.parametrize("flags, named", [
    (["--output", "OUT"], "--output"), (["--json"], "--json"), (["--trace", "OUT"], "--trace"),
    (["--json", "--tp", "2"], "--json, --tp")])
def test_copy_without_a_gpu_refuses_what_asks_for_a_measurement(tmp_path, monkeypatch, capsys,
                                                                flags, named):
    """With no GPU and no --device, copy prints what it would move and exits 0. Asked for a
    Result, a JSON line, a trace or ranks, it exited 0 with none of them (and --tp started
    torchrun first); now one line naming the flags, before any folder or rank exists."""
    from infermeter.cli import main
    from infermeter.copy import job

    monkeypatch.setattr(job, "gpu_available", lambda: False)
    monkeypatch.setattr("infermeter.launch.relaunch_if_needed",
                        lambda tp, argv: pytest.fail("started torchrun") if tp else None)
    out = tmp_path / "out"
    args = [str(out) if flag == "OUT" else flag for flag in flags]
    assert main(["copy", "--model", "debug", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"infermeter: error: no CUDA GPU found, so nothing to measure for {named} "
                   "(--device cpu runs a host-memcpy version)"]
    assert not out.exists()
    assert main(["copy", "--model", "debug"]) == 0  # the plan alone
    assert "it would move" in capsys.readouterr().err


@pytest.mark.parametrize("seq_len", ["1", "257", "1000000000000"])
def test_run_refuses_a_cache_length_before_any_stage(tmp_path, seq_len):
    """The kv stage ran and wrote its Results, then each later stage failed with its own error
    line (exit 2, a folder of kv Results alone)."""
    out = run("run", "--model", "debug", "--seq-len", seq_len, "--out", str(tmp_path / "r"))
    assert_one_error_line(out, f"--seq-len {seq_len}: the cache holds a prompt and new tokens, "
                          "so it takes 2 to 256 tokens (debug's context)")
    assert not (tmp_path / "r").exists()


def test_a_trace_folder_is_made_only_when_a_trace_is_written(tmp_path):
    """--trace made its folder first; a check failing after it left an empty folder behind.
    A folder that cannot be made is still refused up front."""
    trace = tmp_path / "deep" / "trace"
    out = run("generate", "--model", "debug", "--device", "cpu", "--trace", str(trace),
              "--max-new-tokens", "300")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not (tmp_path / "deep").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    for folder, message in ((blocker, "a file, not a folder"),
                            (blocker / "trace", f"cannot create the folder ({blocker} is a file)")):
        out = run("generate", "--model", "debug", "--device", "cpu", "--trace", str(folder),
                  "--max-new-tokens", "2")
        assert_one_error_line(out, f"--trace {folder}: {message}")
