"""Which dependencies of each CUDA graph a process captures are programmatic (PDL's early
launch), kernel by kernel: any `infermeter generate` command, run under a hook that reads every
graph as it is captured.

    python3 benchmarks/graph_edges.py --edges FILE.json -- generate --model llama-3.2-1b ...

Why: a kernel launched with programmatic dependent launch may start before the one ahead ends
only where the captured graph holds a programmatic edge between the two. Batch 8 at 1B runs
with most of its kernels starting early in one process and few in another of the same code
(docs/engine.md, "Batch 8 and 32 at Llama-3.2-1B"); the edges say whether the difference is in
the graph as captured or in how the GPU runs it.

How: torch.cuda.CUDAGraph is made with keep_graph=True (so the captured cudaGraph_t survives
capture_end), and instantiated right after capture as it would be without; the CUDA driver
(libcuda, through ctypes) then lists the graph's nodes (type; a kernel's name, launch
shape: grid, block, dynamic shared memory, and code: registers a thread, local (spilled) and
static shared bytes) and edges (with their data: its type, programmatic or
full, and the port it leaves the kernel ahead from). FILE gets one summary a graph, in capture
order: node counts by type, kernel-to-kernel edges, the programmatic ones, the edges by kind,
and each kernel name's count, programmatic in-edges, launch shapes and codes (two processes'
kernels of one name but other tiles differ in the shapes; built other ways, in the codes).
The generate command's own Result (its --output) says how fast the step ran.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.result import atomic_write

# CUgraphNodeType, by value (cuda.h)
NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty",
              6: "wait event", 7: "event record", 8: "semaphore signal", 9: "semaphore wait",
              10: "mem alloc", 11: "mem free", 12: "batch mem op", 13: "conditional"}
PROGRAMMATIC_TYPE = 1  # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
# CU_GRAPH_KERNEL_NODE_PORT_*: when the edge fires on the upstream kernel
PORTS = {0: "at its end", 1: "at its trigger (programmatic)", 2: "once all its blocks began"}
# CUfunction_attribute, by value: what a kernel's build fixed
CODE_ATTRIBUTES = {"registers": 4, "local": 3, "static shared": 1}


def edge_kind(from_port: int, kind: int) -> str:
    """An edge's data (CUgraphEdgeData) in words: its type, and the port it leaves from."""
    named = "programmatic" if kind == PROGRAMMATIC_TYPE else "full" if kind == 0 else f"type {kind}"
    return f"{named}, {PORTS.get(from_port, f'port {from_port}')}"


def launch_shape(params: bytes) -> str:
    """A kernel node's launch in words, from its CUDA_KERNEL_NODE_PARAMS_v2 (func, then grid
    x, y, z, block x, y, z and shared memory bytes as unsigned 32-bit ints, little-endian)."""
    grid_x, grid_y, grid_z, block_x, block_y, block_z, shared = struct.unpack_from("<7I", params, 8)
    return (f"grid {grid_x}x{grid_y}x{grid_z}, block {block_x}x{block_y}x{block_z}, "
            f"shared {shared}")


def code_text(values: dict[str, int | None]) -> str:
    """A kernel's build in words: each CODE_ATTRIBUTES value, "?" where the driver gave none
    (registers a thread; local and static shared memory in bytes)."""
    return ", ".join(f"{name} {'?' if values.get(name) is None else values[name]}"
                     for name in CODE_ATTRIBUTES)


def summarize(nodes: dict[int, tuple[str, str, str, str]],
              edges: Iterable[tuple[int, int, int, int]]) -> dict[str, Any]:
    """One graph's summary. nodes: handle -> (type, kernel name, launch shape, code; "" for
    all three off a kernel), in the driver's order; edges: (from, to, from_port, type) per
    dependency."""
    types: dict[str, int] = {}
    kernels: dict[str, dict[str, Any]] = {}
    for kind, name, shape, code in nodes.values():
        types[kind] = types.get(kind, 0) + 1
        if kind == "kernel":
            kernels.setdefault(name, {"name": name, "count": 0, "programmatic_in": 0,
                                      "launches": {}, "codes": {}})
            kernels[name]["count"] += 1
            for counts, key in ((kernels[name]["launches"], shape),
                                (kernels[name]["codes"], code)):
                counts[key] = counts.get(key, 0) + 1
    between = programmatic = 0
    kinds: dict[str, int] = {}
    for source, target, port, kind in edges:
        if nodes[source][0] != "kernel" or nodes[target][0] != "kernel":
            continue
        between += 1
        named = edge_kind(port, kind)
        kinds[named] = kinds.get(named, 0) + 1
        if kind == PROGRAMMATIC_TYPE:
            programmatic += 1
            kernels[nodes[target][1]]["programmatic_in"] += 1
    return {"nodes": len(nodes), "node_types": types, "kernel_edges": between,
            "programmatic_edges": programmatic, "edge_kinds": kinds,
            "kernels": list(kernels.values())}


class Driver:
    """The few CUDA driver calls that read a graph (CUDA 12.3 or later: edge data, names)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        if version.value < 12030:
            raise InfermeterError(f"the CUDA driver is {version.value}: reading a graph's edge "
                                  "data needs 12.3 or later")
        # CUDA 13 gave the _v2 signatures the plain names
        self.get_edges = self._pick("cuGraphGetEdges_v2", "cuGraphGetEdges", version.value)
        self.kernel_params = self._pick("cuGraphKernelNodeGetParams_v2",
                                        "cuGraphKernelNodeGetParams", version.value)

    def _pick(self, v2: str, plain: str, version: int) -> Any:
        if hasattr(self.lib, v2):
            return getattr(self.lib, v2)
        if version >= 13000:
            return getattr(self.lib, plain)
        raise InfermeterError(f"this CUDA driver has no {v2}")

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            raise InfermeterError(f"{call} failed with CUDA driver error {status}")

    def kernel(self, node: int) -> tuple[str, str, str]:
        """A kernel node's (name, launch shape, code)."""
        # CUDA_KERNEL_NODE_PARAMS_v2: func at 0, kern (a library kernel) at 56; 128 bytes hold it
        params = (ctypes.c_uint64 * 16)()
        self._check(self.kernel_params(ctypes.c_void_p(node), params), "kernel node params")
        shape = launch_shape(bytes(params))
        code = code_text(self.code(params[0], params[7]))
        name, status = ctypes.c_char_p(), 0
        if params[0]:
            status = self.lib.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(params[0]))
        elif params[7]:
            status = self.lib.cuKernelGetName(ctypes.byref(name), ctypes.c_void_p(params[7]))
        if status:  # a kernel without a name still counts, and its edges with it
            return f"? (driver error {status})", shape, code
        return (name.value or b"?").decode(errors="replace"), shape, code

    def code(self, function: int, library_kernel: int) -> dict[str, int | None]:
        """What the build of a node's kernel fixed (CODE_ATTRIBUTES), from its CUfunction, or
        from its CUkernel on the current context's device; None where the driver gave none."""
        if function:
            def ask(out: Any, attribute: int) -> int:
                return self.lib.cuFuncGetAttribute(out, attribute, ctypes.c_void_p(function))
        else:
            device = ctypes.c_int()
            if not library_kernel or self.lib.cuCtxGetDevice(ctypes.byref(device)):
                return dict.fromkeys(CODE_ATTRIBUTES)

            def ask(out: Any, attribute: int) -> int:
                return self.lib.cuKernelGetAttribute(out, attribute,
                                                     ctypes.c_void_p(library_kernel), device)
        values: dict[str, int | None] = {}
        for name, attribute in CODE_ATTRIBUTES.items():
            value = ctypes.c_int()
            values[name] = None if ask(ctypes.byref(value), attribute) else value.value
        return values

    def read(self, graph: int) -> tuple[dict[int, tuple[str, str, str, str]],
                                        list[tuple[int, ...]]]:
        """(nodes: handle -> (type, name, launch shape, code), edges: (from, to, from_port,
        type)) of a CUgraph."""
        handle = ctypes.c_void_p(graph)
        count = ctypes.c_size_t()
        self._check(self.lib.cuGraphGetNodes(handle, None, ctypes.byref(count)), "cuGraphGetNodes")
        found = (ctypes.c_void_p * count.value)()
        self._check(self.lib.cuGraphGetNodes(handle, found, ctypes.byref(count)),
                    "cuGraphGetNodes")
        nodes = {}
        for node in found[:count.value]:
            kind = ctypes.c_int()
            self._check(self.lib.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)),
                        "cuGraphNodeGetType")
            name = NODE_TYPES.get(kind.value, f"type {kind.value}")
            nodes[node] = (name, *self.kernel(node)) if name == "kernel" else (name, "", "", "")
        self._check(self.get_edges(handle, None, None, None, ctypes.byref(count)), "edges")
        sources, targets = (ctypes.c_void_p * count.value)(), (ctypes.c_void_p * count.value)()
        data = (ctypes.c_uint8 * (8 * count.value))()  # CUgraphEdgeData: from_port, to_port, type
        self._check(self.get_edges(handle, sources, targets, data, ctypes.byref(count)), "edges")
        edges = [(sources[i], targets[i], data[8 * i], data[8 * i + 2]) for i in range(count.value)]
        return nodes, edges


def hook(driver: Driver, graphs: list[dict[str, Any]]) -> None:
    """Every CUDAGraph made from now on keeps its cudaGraph_t; each capture is instantiated at
    once (as without the hook) and summarized into `graphs`."""
    import torch

    cls = torch.cuda.CUDAGraph
    if "keep_graph" not in inspect.signature(cls.__new__).parameters or \
            not hasattr(cls, "instantiate") or not hasattr(cls, "raw_cuda_graph"):
        raise InfermeterError(f"torch {torch.__version__}'s CUDAGraph cannot keep its graph "
                              "(keep_graph, instantiate, raw_cuda_graph)")
    # keep_graph reaches the C++ graph through __init__ (pybind builds the object there, with
    # the call's own arguments): a __new__ that passes True is not enough
    init, end = cls.__init__, cls.capture_end

    def keeping(self: Any, keep_graph: bool = False) -> None:
        init(self, True)

    def capture_end(self: Any) -> None:
        end(self)
        self.instantiate()
        try:
            graphs.append(summarize(*driver.read(self.raw_cuda_graph())))
        except InfermeterError as err:  # the run goes on; the file says what was not read
            graphs.append({"error": str(err)})

    cls.__init__ = keeping
    cls.capture_end = capture_end


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", required=True, metavar="FILE",
                        help="where the graphs' summaries go (JSON)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then an infermeter command (generate ...)")
    return parser


def infermeter_command(args: argparse.Namespace) -> list[str]:
    """The infermeter command's words, after the `--`."""
    return args.command[1:] if args.command[:1] == ["--"] else args.command


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    command = infermeter_command(args)
    if not command:
        parser.error("give the infermeter command after --")
    try:
        import torch

        if not torch.cuda.is_available():
            raise InfermeterError("reading CUDA graphs needs a CUDA GPU")
        if not Path(args.edges).resolve().parent.is_dir():
            raise InfermeterError(f"{args.edges}: its folder does not exist")
        graphs: list[dict[str, Any]] = []
        hook(Driver(), graphs)
    except InfermeterError as err:
        print(f"graph_edges: error: {err}", file=sys.stderr)
        return 2
    from infermeter.cli import main as infermeter

    status = infermeter(command)
    atomic_write(args.edges, (json.dumps(graphs, indent=1) + "\n").encode())
    read = [g for g in graphs if "error" not in g]
    unread = [g for g in graphs if "error" in g]
    print(f"graph_edges: {len(graphs)} graphs; the largest: "
          + "; ".join(f"{g['node_types'].get('kernel', 0)} kernels, {g['programmatic_edges']} of "
                      f"{g['kernel_edges']} kernel edges programmatic"
                      for g in sorted(read, key=lambda g: -g["nodes"])[:3])
          + (f"; {len(unread)} not read ({unread[0]['error']})" if unread else ""))
    return status or 0


if __name__ == "__main__":
    raise SystemExit(main())
