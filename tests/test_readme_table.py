"""The README's reference table is what `infermeter report results/ --with-seed --format markdown`
prints from the committed Results: a new Result that changes a column must come with the README."""

from pathlib import Path

from infermeter.report.build import build_report, render

ROOT = Path(__file__).resolve().parents[1]


def reference_table(text: str) -> list[str]:
    """The first markdown table whose header row starts "| Device |", line by line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Device |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_readme_reference_table_matches_the_committed_results():
    report = render(build_report([str(ROOT / "results")], with_seed=True), "markdown")
    printed = reference_table(report)
    assert len(printed) >= 8  # header, rule, six rows
    assert reference_table((ROOT / "README.md").read_text()) == printed
