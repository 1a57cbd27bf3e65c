"""The HTML report in a real browser: headless Chromium opens it, every plot decodes, and the
console stays silent.

How it is checked without a driver: the page's own script sets data-images="decoded/total" on
<html> once loaded; `--dump-dom` prints the DOM after `--virtual-time-budget` (virtual time, so
the load event has fired), and `--enable-logging=stderr` writes every console message as a
"CONSOLE" line on stderr. A control page with a console error and a broken image proves the
check can fail. Skipped only when no Chromium is installed (.ci/run installs it).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infermeter.report.build import build_report, render

FIXTURES = Path(__file__).parent / "fixtures" / "report"
BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (apt-get install "
                                "chromium); .ci/run installs it")


def open_in_browser(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after load, and the console lines the browser logged."""
    out = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


def images(dom: str) -> str | None:
    match = re.search(r'<html[^>]*\bdata-images="([^"]*)"', dom)
    return match.group(1) if match else None


def test_report_page_shows_every_plot_and_logs_nothing(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(build_report([str(FIXTURES)], with_seed=True), "html"))
    dom, console = open_in_browser(page, tmp_path / "profile")
    assert console == []
    assert images(dom) == "5/5"  # two copy plots, TPOT, batch, headline
    assert "Reference table" in dom and "Reload vs recompute" in dom


def test_the_check_catches_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    good = render(build_report([str(FIXTURES / "copy-h100.jsonl")]), "html")
    page.write_text(good.replace("<body>", '<body><img src="data:image/png;base64,AAAA">'
                                 '<script>console.error("boom")</script>', 1))
    dom, console = open_in_browser(page, tmp_path / "profile")
    assert any('"boom"' in line for line in console)
    assert images(dom) == "2/3"  # the copy plot and the headline decode, the broken one not
