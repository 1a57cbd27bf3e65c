"""engine/op_fallbacks.py: each custom op of ours has inductor's fallback before inductor lowers
a graph, so inductor never formats the op's arguments (their whole IR graph: a compile of the
135M fused head that never ended under torch 2.11)."""

import logging

import pytest
import torch
from torch._inductor import exc as inductor_exc
from torch._inductor.lowering import lowerings, maybe_layout_constraints

from infermeter.engine.generator import Generator
from infermeter.engine.op_fallbacks import FALLBACKS, inductor_options, lacks_lowering


def _probe(name: str) -> torch._ops.OpOverload:
    """A fresh op of ours (each test its own: a fallback, once made, stays for the process):
    x * 3 + 1 with its fake."""

    @torch.library.custom_op(f"infermeter::{name}", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1

    @probe.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    return getattr(torch.ops.infermeter, name).default


def test_the_pass_gives_our_ops_inductor_s_own_fallback_and_leaves_the_graph() -> None:
    op = _probe("fallback_probe_graph")
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    added = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    graph.output(graph.call_function(op, (added,)))
    before = [(n.op, n.target) for n in graph.nodes]
    assert lacks_lowering(op) and not lacks_lowering(torch.ops.aten.add.Tensor)
    assert not lacks_lowering(torch.ops.aten.sin.default)  # not ours, whatever its lowering
    FALLBACKS(graph)
    assert op in lowerings and not lacks_lowering(op)
    assert maybe_layout_constraints(op) is not None  # a custom op's default tag's constraint
    assert [(n.op, n.target) for n in graph.nodes] == before
    FALLBACKS(graph)  # a second graph with the op: nothing more to do
    assert FALLBACKS.uuid() == FALLBACKS.uuid()  # one cache key part, so graphs stay cached


@pytest.fixture
def formatted(monkeypatch):
    """Each op whose arguments inductor formats for its fallback log: the log on, at INFO, with
    a handler that formats every record (torch 2.13 formats lazily, 2.11 always)."""
    names: list[str] = []
    real = inductor_exc.OperatorIssue.operator_str

    def recording(target, args, kwargs):
        names.append(str(target))
        return real(target, args, kwargs)

    monkeypatch.setattr(inductor_exc.OperatorIssue, "operator_str", staticmethod(recording))
    logger = logging.getLogger("torch._inductor.graph")
    handler = logging.Handler()
    handler.emit = lambda record: record.getMessage()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield names
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_compile_with_the_pass_never_formats_an_op_s_arguments(formatted) -> None:
    """Compiled by inductor (no cached graph): without the pass inductor formats an op's
    arguments as it makes the fallback (what the check would miss); with it, never, and the op
    gets the fallback inductor gave the other, layout constraint and all, with eager's values."""
    x = torch.arange(6.0).view(2, 3)
    constraints = {}
    for with_pass in (False, True):
        op = _probe(f"fallback_probe_{'with' if with_pass else 'without'}")
        torch._dynamo.reset()
        options = {"fx_graph_cache": False, **(inductor_options() if with_pass else {})}
        step = torch.compile(lambda x, op=op: op(x + 1) * 2, options=options, fullgraph=True)
        assert torch.equal(step(x), ((x + 1) * 3 + 1) * 2)
        assert (str(op) in formatted) is not with_pass, formatted
        constraints[with_pass] = maybe_layout_constraints(op)
    assert constraints[True] is constraints[False] is not None


def test_every_compile_of_the_generator_runs_the_pass() -> None:
    """The step's, the prefill's and the layer graphs' options all carry it, under the
    request's own options (which win)."""
    from infermeter.engine.model import build_model
    from infermeter.specs.presets import PRESETS

    generator = Generator(build_model(PRESETS["debug"]), compile_options={"max_autotune": True})
    options = generator._options({"triton.cudagraphs": False})
    assert options["post_grad_custom_pre_pass"] is FALLBACKS
    assert options["emulate_precision_casts"] and options["max_autotune"]
    assert options["triton.cudagraphs"] is False
    mine = Generator(build_model(PRESETS["debug"]),
                     compile_options={"post_grad_custom_pre_pass": None})
    assert mine._options()["post_grad_custom_pre_pass"] is None


def test_graphs_compiled_with_the_pass_stay_cached() -> None:
    """The pass has a uuid, so inductor's graph cache keeps such graphs: a second compile of the
    same function loads the first's graph (a pass without one would bypass the cache, and every
    warm-up would compile afresh)."""
    from torch._dynamo.utils import counters

    op = _probe("fallback_probe_cached")
    x = torch.arange(4.0)
    seen = []
    for _ in range(2):
        torch._dynamo.reset()
        before = dict(counters["inductor"])
        step = torch.compile(lambda x: op(x * 2) - 1, options={**inductor_options(),
                                                                "fx_graph_cache": True})
        assert torch.equal(step(x), (x * 2) * 3 + 1 - 1)
        seen.append({key: counters["inductor"][key] - before.get(key, 0)
                     for key in ("fxgraph_cache_hit", "fxgraph_cache_bypass")})
    assert seen[1] == {"fxgraph_cache_hit": 1, "fxgraph_cache_bypass": 0}, seen
    assert seen[0]["fxgraph_cache_bypass"] == 0, seen
