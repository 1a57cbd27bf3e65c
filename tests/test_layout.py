"""The package's layout is a contract (docs/design.md, "Architecture"): layers import only downward
(import-linter's contracts in pyproject.toml), no module imports another in a circle, no module
imports another's private names or reaches into sys.modules, and the top level stays small.
The repository's text carries no lab-notebook history and cites nothing outside itself."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "infermeter"
TOP_LEVEL_LIMIT = 8


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_layer_contracts_hold():
    """import-linter, run on the contracts written in pyproject.toml."""
    importlinter = pytest.importorskip("importlinter")
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None), \
        "an import runs against the layers: run `lint-imports` for the list"
    assert importlinter  # the contracts ran through this package, not a stand-in


def test_the_contract_names_every_room():
    """A new top-level folder must be placed in a layer, or nothing would check its imports."""
    text = (ROOT / "pyproject.toml").read_text()
    layers = text.split("[tool.importlinter]", 1)[1]
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = {name for name in rooms | modules if f'"infermeter.{name}' not in layers
               and f"infermeter.{name} " not in layers and f"| infermeter.{name}" not in layers}
    assert not missing, f"not in any layer of the import-linter contract: {sorted(missing)}"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    names = {_module_name(p) for p in _sources()}
    graph: dict[str, set[str]] = {}
    for path in _sources():
        edges = set()
        for module, taken in _imports(path):
            for target in [module] + [f"{module}.{name}" for name in taken]:
                if target in names:
                    edges.add(target)
        graph[_module_name(path)] = edges - {_module_name(path)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_in_a_circle():
    """Counted with lazy (function-level) and type-checking imports: a cycle hidden inside a
    function is still two modules that cannot be understood apart."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{path.relative_to(ROOT)}: from {module} import {name}"
                 for path in _sources() for module, names in _imports(path)
                 if module.startswith("infermeter") for name in names
                 if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_no_module_reaches_into_sys_modules():
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if "sys.modules" in p.read_text()]
    assert offenders == []


def test_the_top_level_holds_at_most_eight_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= TOP_LEVEL_LIMIT, modules


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in filter(None, out):
        path = ROOT / name
        if path.suffix in (".gz", ".png") or not path.is_file():
            continue
        files.append(path)
    return files


def test_no_file_numbers_the_history_by_work_periods():
    """Dates and commit ids name when something was measured or changed, never a numbered work
    period of the lab notebook (the word is spelled in two halves here so this file passes)."""
    word = re.compile(r"\bsess" + r"ions?\b", re.IGNORECASE)
    offenders = []
    for path in _tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in
                      enumerate(text.splitlines(), 1) if word.search(line)]
    assert offenders == []


def test_nothing_in_the_package_cites_a_document_outside_the_repository():
    """Every .md file the code names exists in the repository (docs/design.md is the contract;
    the brief the project started from is not part of it)."""
    cited = re.compile(r"\b(?:docs/[\w/-]+|(?:[\w-]+/)*[A-Z][A-Za-z_-]*)\.md\b")
    missing = []
    for path in _sources():
        for name in cited.findall(path.read_text()):
            if not any((ROOT / where / name).exists() for where in ("", "docs")):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 15_000, f"README.md is {len(text)} characters"
    assert "pip install -e '.[test]' && python -m pytest" in text  # the command CI runs
    # the main job on its default: `infermeter run` with no options ends a quick-start line
    assert re.search(r"infermeter run\s*(#.*)?$", text, re.MULTILINE)
    user_docs = ("usage", "run", "kv", "copy", "generate", "offload", "gguf", "trace", "parallel",
                 "report", "results")
    for doc in (*(f"docs/{page}.md" for page in user_docs), "docs/design.md", "docs/engine.md",
                "results/README.md"):
        assert (ROOT / doc).is_file() and doc in text, doc
