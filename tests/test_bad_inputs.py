"""Bad input on the command line: one `error:` line on stderr, a non-zero exit, no traceback,
nothing written. Each case here once ended otherwise (a traceback, exit 0, a wrong file)."""

import json
import subprocess
import sys

from tests import published_configs as published


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "infermeter", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


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
