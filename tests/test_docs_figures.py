"""Every measured figure the docs quote is found in the Result file they name beside it.

A paragraph (or a table row) of README.md or docs/*.md that names files under results/ is held
to them: each number it gives with a unit of measurement (ms, us, s, tok/s, GB/s, TB/s, TFLOP/s,
%) must appear, at the precision written, in one of those files. Ratios ("1.7x") are computed
from two figures and are not checked here; neither are numbers without a unit (batch sizes).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"results/([\w.*/-]+)(?![\w.*<-])")  # not a pattern like copy-<gpu>.jsonl
FIGURE = re.compile(r"(?<![\w.])(\d[\d,]*\.?\d*)\s?(ms|us|µs|s|tok/s|GB/s|TB/s|TFLOP/s|%)"
                    r"(?![\w/])")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _blocks(text: str) -> list[str]:
    """Paragraphs, with every table row and list item a block of its own."""
    blocks, current = [], []
    for line in text.splitlines():
        starts_item = line.lstrip().startswith(("|", "- ", "* "))
        if not line.strip() or starts_item:
            if current:
                blocks.append(" ".join(current))
            current = [line] if starts_item else []
            continue
        current.append(line)
    if current:
        blocks.append(" ".join(current))
    return blocks


@cache
def _numbers(name: str) -> frozenset[float]:
    paths = sorted((ROOT / "results").glob(name))
    values = set()
    for path in paths:
        if path.is_file() and path.suffix != ".gz":
            # magnitudes: the docs say a negative gap in words ("2.05% faster")
            values.update(abs(float(n)) for n in NUMBER.findall(path.read_text(errors="replace")))
    return frozenset(values)


def _found(figure: str, names: list[str]) -> bool:
    """The figure, rounded as written, equals a number in one of the files (or a thousandth
    of one: a file in microseconds or bytes quoted in ms or GB is still the same number)."""
    text = figure.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(text)
    step = 10 ** -decimals / 2
    for name in names:
        for number in _numbers(name):
            for scaled in (number, number * 1e3, number / 1e3, number * 100):
                if abs(scaled - value) <= step + 1e-9:
                    return True
    return False


def _cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    for doc in DOCS:
        for block in _blocks(doc.read_text()):
            names = [n.rstrip(".,;:)") for n in CITED.findall(block)]
            names = [n for n in names if n and n != "README.md" and _numbers(n)]
            if names:
                cases += [(doc.name, figure, names) for figure, _ in FIGURE.findall(block)]
    return cases


def test_every_cited_result_file_exists():
    missing = sorted({f"{doc.name}: results/{name}" for doc in DOCS
                      for name in CITED.findall(doc.read_text())
                      if name.rstrip(".,;:)") and not list((ROOT / "results").glob(
                          name.rstrip(".,;:)")))})
    assert missing == []


def test_the_docs_cite_figures_at_all():
    assert len(_cases()) > 50  # the check below would pass vacuously on docs without figures


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_every_figure_is_in_the_result_it_names(doc):
    absent = [f"{figure} (in {', '.join(names)})" for name, figure, names in _cases()
              if name == doc and not _found(figure, names)]
    assert absent == []


def test_a_figure_not_in_its_file_is_caught():
    assert not _found("123456.7", ["generate-nvidia-h200.jsonl"])
    assert _found(next(f for _, f, n in _cases() if "generate-nvidia-h200.jsonl" in n),
                  ["generate-nvidia-h200.jsonl"])
