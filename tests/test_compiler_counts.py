"""metrics.compiler (measure/compiler.py): what torch's compiler tuned and loaded over a case's
warm-up, as deltas of torch's own counters, so a later case does not inherit an earlier one's."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from infermeter.measure import compiler


def test_the_counts_are_torchs_counters_under_our_names_and_a_case_gets_their_growth():
    before = compiler.compiler_counts()
    assert set(before) == {"tuning_benchmarks", "graph_cache_hits", "graph_cache_misses",
                           "graph_cache_bypasses"}
    counters["inductor"]["coordesc_tuning_bench"] += 7
    counters["inductor"]["fxgraph_cache_hit"] += 2
    try:
        after = compiler.compiler_counts()
        assert compiler.compiler_metrics(before, after) == {
            "tuning_benchmarks": 7, "graph_cache_hits": 2, "graph_cache_misses": 0,
            "graph_cache_bypasses": 0}
    finally:  # the counters are the process's: leave them as found
        counters["inductor"]["coordesc_tuning_bench"] -= 7
        counters["inductor"]["fxgraph_cache_hit"] -= 2
    assert compiler.compiler_counts() == before


def test_a_compiled_case_counts_its_graphs_and_an_eager_or_reusing_case_counts_none():
    """Through the loop on the CPU: the compiled case's warm-up compiles (every graph is a
    cache hit, miss or bypass) and times no Triton config (inductor's CPU kernels are C++);
    the eager case and a second compiled case on the first one's runner compile nothing."""
    from infermeter.engine.generator import GenerationConfig
    from infermeter.engine.model import build_model
    from infermeter.generate import loop
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.request import GenerateRequest, Timing
    from infermeter.specs.presets import PRESETS

    spec = PRESETS["debug"]
    model = build_model(spec, seed=1)
    sets = prompt_sets((1,), (4, 6), (), spec.vocab_size, 0, ())
    cases = plan_cases(spec, sets, ("eager", "compiled"), 3)
    request = GenerateRequest("random:debug", sampling=GenerationConfig(max_new_tokens=3),
                              timing=Timing(repeats=1, warmup=0, share_compiled=True))
    base = {"dtype": "float32", "kv_dtype": "float32", "repeats": 1, "warmup": 0}
    torch._dynamo.reset()
    with torch.inference_mode():
        results = loop.run_generation(model, cases, request, {"device_name": "cpu"}, base, None)
    counts = {(r.config["mode"], r.config["prompt_len"]): r.metrics["compiler"] for r in results}
    none = dict.fromkeys(counts[("eager", 4)], 0)
    assert counts[("eager", 4)] == counts[("eager", 6)] == none
    first = counts[("compiled", 4)]
    assert first["tuning_benchmarks"] == 0
    assert first["graph_cache_hits"] + first["graph_cache_misses"] + \
        first["graph_cache_bypasses"] >= 1
    assert counts[("compiled", 6)] == none  # the runner, its graphs and picks reused


def test_generate_says_per_case_what_its_compiler_did_and_why_it_matters():
    """generate/table.py: a case that compiled afresh, one that reloaded, one that did nothing
    (eager, or an earlier case's step reused: no line), and the caution once, after them."""
    from infermeter.generate.table import compiler_line, compiler_lines
    from infermeter.measure.result import Result

    fresh = {"tuning_benchmarks": 110, "graph_cache_hits": 0, "graph_cache_misses": 2,
             "graph_cache_bypasses": 0}
    loaded = {"tuning_benchmarks": 0, "graph_cache_hits": 2, "graph_cache_misses": 0,
              "graph_cache_bypasses": 0}
    mixed = {"tuning_benchmarks": 1, "graph_cache_hits": 1, "graph_cache_misses": 0,
             "graph_cache_bypasses": 1}
    assert compiler_line(fresh) == "compiled 2 graphs afresh, timed 110 kernel configs"
    assert compiler_line(loaded) == ("loaded 2 graphs from the compiler's cache, timed no "
                                     "kernel config")
    assert compiler_line(mixed) == ("compiled 1 graph afresh, loaded 1 graph from the "
                                    "compiler's cache, timed 1 kernel config")
    assert compiler_line(compiler.NOTHING) is None and compiler_line({}) is None

    def case(counts):
        return Result("generate", {"name": "debug"}, {}, {}, {"compiler": counts})

    lines = compiler_lines([case(compiler.NOTHING), case(fresh), case(loaded)])
    assert [line.split(":")[0] for line in lines] == ["compiler, row 2", "compiler, row 3",
                                                      "compiler"]
    assert "Comparing two runs" in lines[-1]
    assert compiler_lines([case(compiler.NOTHING), case({})]) == []  # eager only: nothing said


def test_graphs_built_reads_made_and_loaded_from_any_result():
    """measure/compiler.graphs_built, which generate's line and the report's cell share: misses
    and bypasses are graphs compiled afresh, hits graphs loaded; a count missing or not a
    number (another tool's Result) counts 0."""
    assert compiler.graphs_built({"graph_cache_misses": 2, "graph_cache_bypasses": 1,
                                  "graph_cache_hits": 3}) == (3, 3)
    assert compiler.graphs_built({"graph_cache_hits": "2", "graph_cache_misses": True,
                                  "graph_cache_bypasses": float("nan")}) == (0, 0)
    assert compiler.graphs_built(None) == compiler.graphs_built({}) == (0, 0)
