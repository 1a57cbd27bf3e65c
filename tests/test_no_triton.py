"""Without Triton installed a run prints no "Triton not available" lines (torch.library.triton_op
warned once for each of our three ops), and nothing else torch logs is hidden."""

import subprocess
import sys

# Triton made unimportable, as on a CPU-only install, before anything imports torch.
WITHOUT_TRITON = "import sys; sys.modules['triton'] = None\n"


def python(code):
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON + code], capture_output=True,
                          text=True, timeout=300)


def test_a_cpu_run_without_triton_is_quiet():
    out = python("from infermeter.cli import main\n"
                 "sys.exit(main(['generate', '--model', 'debug', '--device', 'cpu', "
                 "'--max-new-tokens', '2', '--repeats', '1', '--warmup', '0', '--json']))")
    assert out.returncode == 0, out.stderr
    assert "Triton not available" not in out.stderr


def test_only_that_message_is_dropped():
    out = python("import logging\n"
                 "from infermeter.engine.kernels import gemv, swiglu, decode_attention\n"
                 "log = logging.getLogger('torch._library.triton')\n"
                 "log.warning('Triton not available, find_triton_kernels = []')\n"
                 "log.warning('another torch warning')\n")
    assert out.returncode == 0, out.stderr
    assert "Triton not available" not in out.stderr
    assert "another torch warning" in out.stderr
