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
    (("--gpu-memory", "80GiB", "--reserve", "-1%"), "reserve '-1%' must be within 0% and 100%"),
])
def test_a_negative_size_is_read_as_a_value(args, message):
    out = run("kv", *args)
    assert_one_error_line(out, message)
    assert out.stdout == ""
