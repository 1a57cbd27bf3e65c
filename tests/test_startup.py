"""What a process that never compiles imports: an eager generate on the CPU (random weights,
the engine's forward, the roofline, the Result) must not import torch's compiler, whose import
(dynamo and inductor, pulled in by registering the Triton kernels' torch.library ops) costs
about a second of every such process's start (model.py, self_attention.py, moe.py and linear.py
import the kernel modules only where a compiled step takes them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_an_eager_cpu_generate_never_imports_the_compiler(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from infermeter.cli import main
        code = main(["generate", "--model", "debug", "--device", "cpu", "--mode", "eager",
                     "--prompt-len", "8", "--max-new-tokens", "4", "--repeats", "1",
                     "--output", {str(tmp_path / "out.jsonl")!r}])
        loaded = sorted(name for name in ("torch._dynamo", "torch._inductor")
                        if name in sys.modules)
        print("exit", code, "compiler", ",".join(loaded) or "none")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "exit 0 compiler none", done.stdout[-2000:]
    assert (tmp_path / "out.jsonl").stat().st_size > 0
