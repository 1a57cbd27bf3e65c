"""Every relative link in the user-facing Markdown (README.md, docs/*.md, results/README.md)
leads somewhere: its file exists, and its #anchor, where it has one, is a heading of that file
(GitHub's anchor rules) or an explicit `<a id=...>` / `<a name=...>` there.

Links are read with markdown-it (rich's own Markdown parser), so a link written inside a code
span or a code block is text, not a link, as GitHub renders it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]
EXPLICIT_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def _tokens(text: str) -> list:
    return MarkdownIt("commonmark").enable("table").parse(text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: lowercase, punctuation dropped (letters, digits,
    '_', '-' and spaces kept), each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors a Markdown file defines: one per heading (a repeated one gets -1, -2, ...
    as GitHub numbers them) and every explicit <a id/name>."""
    text = path.read_text()
    tokens = _tokens(text)
    found, seen = set(EXPLICIT_ANCHOR.findall(text)), {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        words = "".join(child.content for child in inline.children or []
                        if child.type in ("text", "code_inline"))
        base = slug(words)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list[str]:
    """Every link and image target in the file, in order."""
    targets = []
    for token in _tokens(path.read_text()):
        for child in token.children or []:
            if child.type == "link_open":
                targets.append(child.attrs["href"])
            elif child.type == "image":
                targets.append(child.attrs["src"])
    return targets


def broken(path: Path, root: Path = ROOT) -> list[str]:
    """The file's relative links whose file or anchor does not exist, each with why (the file
    named relative to root)."""
    problems = []
    for href in links(path):
        parts = urlsplit(href)
        if parts.scheme or parts.netloc:
            continue  # a web address: not this repository's to check
        target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        where = f"{path.relative_to(root)}: ({href})"
        if not target.exists():
            problems.append(f"{where} no such file")
        elif parts.fragment and target.suffix == ".md":
            if unquote(parts.fragment) not in anchors(target):
                problems.append(f"{where} no heading or <a id> gives #{parts.fragment}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    checked = [href for doc in DOCS for href in links(doc) if not urlsplit(href).scheme]
    assert len(checked) > 50  # the parser found the docs' links (they hold well over 50)
    assert [problem for doc in DOCS for problem in broken(doc)] == []


def test_anchors_follow_githubs_rules():
    assert slug("Timing: TTFT, TPOT, tokens/s and how close they are to the hardware") == \
        "timing-ttft-tpot-tokenss-and-how-close-they-are-to-the-hardware"
    assert slug("Decode under copy traffic: --traffic") == \
        "decode-under-copy-traffic---traffic"
    assert "decode-under-copy-traffic---traffic" in anchors(ROOT / "docs" / "offload.md")
    assert "infermeter-run-the-main-job" in anchors(ROOT / "docs" / "run.md")


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "page.md").write_text("# A page\n\n## Its part: `--flag`\n\n"
                                      '<a id="kept"></a>\n\ntext\n\n## Its part: `--flag`\n')
    doc = tmp_path / "doc.md"
    doc.write_text("[good](page.md#its-part---flag) [again](page.md#its-part---flag-1) "
                   "[explicit](page.md#kept) [self](#a-doc) [web](https://example.com/x.md#y)\n"
                   "`[in code](gone.md)`\n\n# A doc\n\n"
                   "[missing file](gone.md) [missing anchor](page.md#its-part)\n")
    assert broken(doc, root=tmp_path) == ["doc.md: (gone.md) no such file",
                        "doc.md: (page.md#its-part) no heading or <a id> gives #its-part"]
