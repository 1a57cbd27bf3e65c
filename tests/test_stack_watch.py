"""benchmarks/stack_watch.py: a script's main thread sampled while it runs, outermost frame
first, with a recursion's repeating frames folded and counted."""

import re
import subprocess
import sys
import textwrap

from tests.benchmark_scripts import BENCHMARKS, load_benchmark, part_body

folded = load_benchmark("stack_watch").folded


def test_a_repeating_block_is_written_once_and_counted() -> None:
    assert folded(["main", "a", "b", "a", "b", "a", "b", "leaf"]) == \
        ["main", "a", "b", "  [the 2 frame(s) above, 3 times in a row]", "leaf"]
    # one frame calling itself; a block seen once is left alone
    assert folded(["main", "f", "f", "f", "f", "g"]) == \
        ["main", "f", "  [the 1 frame(s) above, 4 times in a row]", "g"]
    assert folded(["a", "b", "c"]) == ["a", "b", "c"]
    # the block covering the most lines wins: (x y) 3 times over x once
    assert folded(["x", "y", "x", "y", "x", "y"]) == \
        ["x", "y", "  [the 2 frame(s) above, 3 times in a row]"]
    # cycles longer than the limit are not folded
    assert folded(list("abcabc"), longest=2) == list("abcabc")


def test_a_deep_recursion_keeps_its_caller_and_the_exit_status(tmp_path) -> None:
    """The script runs as `python SCRIPT ARGS` would: its arguments, a module beside it
    importable, its exit status passed on. A sample taken while it sleeps 600 frames deep
    names the outermost function that started the recursion (faulthandler's last 100 frames
    would not) and folds the recursion into one counted block."""
    (tmp_path / "helper.py").write_text("DEPTH = 300\n")
    script = tmp_path / "deep.py"
    script.write_text(textwrap.dedent("""\
        import sys, time
        from helper import DEPTH

        def ping(n):
            return pong(n) if n else time.sleep(1.0)

        def pong(n):
            return ping(n - 1)

        def the_caller():
            ping(DEPTH)

        if __name__ == "__main__":
            assert sys.argv[1:] == ["--flag", "x"], sys.argv
            the_caller()
            raise SystemExit(3)
        """))
    out = tmp_path / "stacks.txt"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "stack_watch.py"), "--every", "0.3",
                          "--out", str(out), "--", str(script), "--flag", "x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    samples = out.read_text().split("--- ")[1:]
    assert samples, "no sample in a second of sleeping"
    lines = samples[0].splitlines()
    assert "outermost first" in lines[0]
    caller = next(i for i, line in enumerate(lines) if line.endswith(" in the_caller"))
    assert lines[caller + 1].endswith(" in ping") and lines[caller + 2].endswith(" in pong")
    assert lines[caller + 3] == "  [the 2 frame(s) above, 300 times in a row]"
    assert lines[-1].endswith(" in ping")  # the innermost Python frame (sleep is C)


def test_a_message_exit_and_a_missing_script(tmp_path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit('error: no such model')\n")
    run = subprocess.run([sys.executable, str(BENCHMARKS / "stack_watch.py"), "--out",
                          str(tmp_path / "s.txt"), str(script)], capture_output=True, text=True,
                         timeout=60)
    assert (run.returncode, run.stderr.strip()) == (1, "error: no such model")
    run = subprocess.run([sys.executable, str(BENCHMARKS / "stack_watch.py"), "--out",
                          str(tmp_path / "s.txt"), str(tmp_path / "none.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().endswith("none.py: no such file")


def test_the_stall_part_watches_the_fused_head_s_135m_case() -> None:
    """open_targets.sh step-head-stall: the stack watch, then step_kernels_ab.py's one case
    whose warm-up stalled, with arguments its own parser takes."""
    body = part_body("step-head-stall")
    (line,) = re.findall(r"python3 benchmarks/stack_watch\.py (.*?) \|\| true", body)
    words = line.split()
    assert words[:4] == ["--every", "20", "--out", '"$dest/step-head-stall-$slug.txt"']
    assert words[4] == "benchmarks/step_kernels_ab.py"
    step = load_benchmark("step_kernels_ab").arguments().parse_args(words[5:])
    assert (step.one, step.kernels, step.graphs, step.fused_head) == \
        ("smollm2-135m", ["fused"], ["recorded"], ["on"])
