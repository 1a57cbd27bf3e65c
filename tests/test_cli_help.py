"""Every command's --help says what an option does, its default and its choices: no timings,
rates, speed-ups or device names (those belong in the Results and the docs), and `generate
--help` keeps its engine variants in one advanced group, last."""

from __future__ import annotations

import re

import pytest

from infermeter.cli import main

COMMANDS = ([], ["kv"], ["copy"], ["generate"], ["offload"], ["presets"], ["report"], ["run"],
            ["trace"])

# A number, then a unit of time, rate, throughput or speed-up: "5.1 ms", "~25 s", "72%",
# "1.7x", "2 x H100", "108 GB/s", "200 tok/s". argparse may wrap between number and unit.
MEASUREMENT = re.compile(
    r"\d(?:[\d.,]*\d)?\s*(?:ms|us|µs|s|ns|tok/s|tokens/s|[GMT]i?B/s|T?FLOP/?s?|%|x)(?![\w/])")
DEFAULT_BEFORE = re.compile(r"default:?\s*$")  # "(default 10%)" states a default, not a figure
DEVICES = re.compile(r"\b(?:[ABHL]\d{2,3}|GH200|RTX|GTX|MI\d{3}\w*)\b")
REMARKS = ("one run", " vs ", " vs. ")
# What only picks an implementation of the same computation (generate's advanced group).
ENGINE_VARIANTS = ("--compile-backend", "--compile-prefill", "--matvec-kernel", "--pdl",
                   "--decode-attention", "--tp-all-reduce", "--prefill-chunk", "--step-kernels",
                   "--moe-kernel", "--prefill-graphs")
GENERATE_HELP_MAX_LINES = 75  # at 100 columns


def help_text(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def measurements(text: str) -> list[str]:
    """Every timing-like figure of `text`, except a default value ("default 10%")."""
    return [m.group(0) for m in MEASUREMENT.finditer(text)
            if not DEFAULT_BEFORE.search(text[:m.start()])]


def test_the_pattern_finds_figures_and_spares_defaults() -> None:
    found = measurements("H200 7B batch 1: 3.67 vs 3.88\n   ms a step; 72% MFU, ~25 s, 1.7x, "
                         "2 x H100, 108 GB/s, 3 TB/s, 200 tok/s, 5 us, (default 10%)")
    assert found == ["3.88\n   ms", "72%", "25 s", "1.7x", "2 x", "108 GB/s", "3 TB/s",
                     "200 tok/s", "5 us"]
    assert measurements("over 4 streams, 16 tokens, e.g. 80GiB, ids 1,2,3, 5 sites") == []
    assert DEVICES.findall("an H100 host, 2 x H200, RTX 3090, Hopper or later") == [
        "H100", "H200", "RTX"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "infermeter")
def test_help_holds_no_measurements(command, capsys, monkeypatch) -> None:
    text = help_text(command, capsys, monkeypatch)
    assert text.startswith("usage:")
    assert measurements(text) == []
    assert DEVICES.findall(text) == []
    assert [remark for remark in REMARKS if remark in text] == []


def test_generate_help_is_one_screen_with_the_engine_variants_last(capsys, monkeypatch) -> None:
    text = help_text(["generate"], capsys, monkeypatch)
    lines = text.splitlines()
    assert len(lines) <= GENERATE_HELP_MAX_LINES
    assert max(len(line) for line in lines) <= 100
    headings = [i for i, line in enumerate(lines) if re.fullmatch(r"\S.*:", line)]
    advanced = [i for i in headings if lines[i].startswith("advanced")]
    assert advanced == headings[-1:], "one advanced group, the last"
    body = "\n".join(lines[headings[0]:])  # after the usage
    start = body.index(lines[advanced[0]])
    for flag in ENGINE_VARIANTS:
        assert re.search(rf"^\s+{flag}\b", body[start:], re.M), flag
        assert not re.search(rf"^\s+{flag}\b", body[:start], re.M), flag
    for flag in ("--model", "--checkpoint", "--mode", "--batch-size", "--repeats", "--tp",
                 "--json"):
        assert re.search(rf"^\s+{flag}\b", body[:start], re.M), flag


@pytest.mark.parametrize("kind", ["triton-ll", "triton-push"])
def test_removed_all_reduce_kinds_are_refused_by_the_parser(kind, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "debug", "--tp-all-reduce", kind])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"invalid choice: '{kind}'" in err[0], err


def test_the_kept_all_reduce_kinds() -> None:
    from infermeter.commands.generate import ALL_REDUCE_KINDS

    assert ALL_REDUCE_KINDS == ("auto", "nccl", "one-shot", "triton", "triton-unfused")


def test_every_option_says_what_it_does() -> None:
    """An option without help shows only its metavar in --help (kv's --batch-size did)."""
    from infermeter.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and a.dest == "command"]
    bare = [f"{name} {action.option_strings[0]}"
            for name, command in sub.choices.items() for action in command._actions
            if action.option_strings and not action.help]
    assert bare == []


def test_no_command_prints_the_help_then_one_error_line(capsys) -> None:
    """A bare `infermeter` printed the help and exited 2 with no error line saying why."""
    from infermeter.cli import main

    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: infermeter")
    assert err.splitlines() == ["infermeter: error: give a command (kv, copy, generate, offload, "
                                "presets, report, run, trace)"]
