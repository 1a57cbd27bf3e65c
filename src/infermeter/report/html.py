"""The report as one self-contained HTML page: tables, notes and plots (PNG, base64-embedded).

Nothing is fetched: styles are inline, images are data: URIs, there are no web fonts. A few lines
of script mark the page when every image has decoded (data-images="decoded/total" on <html>), so
a headless browser can check that every plot really shows; the page logs nothing to the console.
"""

from __future__ import annotations

import base64
import html

from infermeter.report.plots import Plot
from infermeter.report.render import TITLE, summary_line
from infermeter.report.tables import Report, Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.25em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td:first-child { font-weight: 600; white-space: nowrap; }
.caption { font-size: 0.85em; color: #555; max-width: 70em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
.notes li { font-size: 0.85em; margin: 0.2em 0; }
"""

# Counts images that decoded (complete with a natural width) once the page has loaded.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.documentElement.setAttribute("data-images", decoded.length + "/" + images.length);
});
"""


def _table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                     for row in table.rows)
    return (f'<section id="{esc(table.key)}"><h2>{esc(table.title)}</h2>\n'
            f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n"
            f'<p class="caption">{esc(table.caption)}</p></section>')


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    title = html.escape(plot.title)
    return (f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
            f"<figcaption>{title}</figcaption></figure>")


def render_html(report: Report, plots: list[Plot], plot_note: str = "") -> str:
    esc = html.escape
    parts = [f"<h1>{esc(TITLE)}</h1>", f"<p>{esc(summary_line(report))}</p>"]
    parts += [_table(t) for t in report.tables]
    if plots or plot_note:
        parts.append('<section id="plots"><h2>Plots</h2>')
        parts += [_figure(p) for p in plots]
        if plot_note:
            parts.append(f'<p class="caption">{esc(plot_note)}</p>')
        parts.append("</section>")
    if report.notes:
        items = "\n".join(f"<li>{esc(n)}</li>" for n in report.notes)
        parts.append(f'<section id="notes"><h2>Notes</h2><ol class="notes">\n{items}\n'
                     "</ol></section>")
    head = (f'<meta charset="utf-8"><title>{esc(TITLE)}</title>\n'
            # an empty icon: the browser would otherwise ask for /favicon.ico
            f'<link rel="icon" href="data:,">\n<style>{STYLE}</style>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head>{head}\n</head><body>\n'
            + "\n".join(parts) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
