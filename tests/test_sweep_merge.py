"""benchmarks/generation_sweep.py --merge: a GPU machine's parts replace the same parts only."""

import importlib.util
from pathlib import Path

from infermeter.results import Result, append_jsonl, read_results

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("generation_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(part: str, tag: str) -> Result:
    return Result("generate", {"name": "debug"}, {"run": part, "tag": tag}, {}, {})


def tags(path: Path) -> list[tuple[str, str]]:
    return [(r.config["run"], r.config["tag"]) for r in read_results(path)]


def test_merge_replaces_the_parts_it_brings_and_keeps_the_rest(tmp_path):
    sweep = load_sweep()
    committed, brought = tmp_path / "committed.jsonl", tmp_path / "brought.jsonl"
    append_jsonl(committed, [result("seed", "old"), result("prefill", "old-a"),
                             result("prefill", "old-b"), result("context", "old")])
    append_jsonl(brought, [result("prefill", "new-a"), result("prefill", "new-b")])
    assert sweep.merge_parts(brought, committed) == ["prefill"]
    assert tags(committed) == [("seed", "old"), ("context", "old"), ("prefill", "new-a"),
                               ("prefill", "new-b")]


def test_merge_into_a_missing_file_creates_it(tmp_path):
    sweep = load_sweep()
    brought, committed = tmp_path / "brought.jsonl", tmp_path / "new" / "committed.jsonl"
    committed.parent.mkdir()
    append_jsonl(brought, [result("hf", "x")])
    assert sweep.merge_parts(brought, committed) == ["hf"]
    assert tags(committed) == [("hf", "x")]
