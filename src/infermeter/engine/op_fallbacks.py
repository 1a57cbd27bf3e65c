"""Our custom ops (infermeter::*) made inductor fallbacks before inductor lowers a graph.

Inductor runs an op it has no lowering for as an "implicit fallback": a call of the op's own
code. Making one, torch 2.11 first formats the op's arguments for an info log, whether that log
is on or not (2.13 formats them only for the log), and an argument's text is its whole IR: an
extern kernel prints its inputs, and those theirs. An op first met deep in a step prints the
graph behind it, which doubles at every residual add (a layer's kernels all read the residual
stream). The fused head's norm + GEMV is first met at the end of the 30-layer 135M step: its
compile ran in that printing for minutes and never ended (docs/engine.md, "The final norm in
the head's kernel").

FALLBACKS, a graph pass inductor runs on each graph before lowering it (the compile option
post_grad_custom_pre_pass), makes each such op the same fallback inductor would, with the
layout constraint inductor would give it: inductor then finds a lowering and prints nothing.
The module imports inductor, so only a compile imports it.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

NAMESPACE = "infermeter"


def lacks_lowering(target: object) -> bool:
    """Whether `target` is an op of ours that inductor has no lowering for yet."""
    from torch._inductor.lowering import lowerings

    return isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE \
        and target not in lowerings


def register_fallback(op: torch._ops.OpOverload) -> None:
    """`op` as inductor's implicit fallback makes it (torch/_inductor/graph.py's call_function,
    forward graphs): its layout constraint from the op's tags, or from the default tag torch
    gives a custom op without one. Where a torch lacks these internals, nothing: inductor
    makes the fallback itself, as without this pass."""
    try:
        from torch._inductor.lowering import make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return
    tag = get_layout_constraint_tag(op, with_default=True)
    make_fallback(op, layout_constraint=tag_to_layout_constraint(tag))


class OpFallbacks(CustomGraphPass):
    """The pass: every op of ours in the graph without a lowering gets its fallback. It leaves
    the graph as it is, so a graph cached with it is the graph without it (uuid: the cache key's
    part for this pass)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and lacks_lowering(node.target):
                register_fallback(node.target)

    def uuid(self) -> str:
        return "infermeter-op-fallbacks-1"


FALLBACKS = OpFallbacks()


def inductor_options() -> dict[str, object]:
    """The torch.compile option that runs FALLBACKS before each graph is lowered (as
    kernels/pdl.py's inductor_options give inductor's own kernels PDL)."""
    return {"post_grad_custom_pre_pass": FALLBACKS}
