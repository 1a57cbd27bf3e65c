"""benchmarks/graph_edges.py: which edges of a captured CUDA graph are programmatic (PDL), by
kernel. The driver's reading needs a GPU; its summary, the hook's wiring and the refusals are
checked here with stand-ins."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from infermeter.cli import build_parser
from tests.benchmark_scripts import load_benchmark, part_body

edges = load_benchmark("graph_edges")


def test_an_edge_is_named_by_its_type_and_the_port_it_leaves_from():
    assert edges.edge_kind(0, 0) == "full, at its end"
    assert edges.edge_kind(1, 1) == "programmatic, at its trigger (programmatic)"
    assert edges.edge_kind(2, 1) == "programmatic, once all its blocks began"
    assert edges.edge_kind(7, 3) == "type 3, port 7"


def test_a_kernel_s_launch_shape_is_read_from_its_node_params():
    """CUDA_KERNEL_NODE_PARAMS_v2 as the driver fills the 16 words: func, grid, block, shared
    memory (32-bit each, after the 64-bit func), then pointers the shape leaves out."""
    import ctypes
    import struct

    raw = struct.pack("<Q7I", 0xDEADBEEF, 64, 8, 1, 128, 1, 1, 18432)
    params = (ctypes.c_uint64 * 16).from_buffer_copy(raw.ljust(128, b"\xff"))
    assert edges.launch_shape(bytes(params)) == "grid 64x8x1, block 128x1x1, shared 18432"


def test_a_graph_s_summary_counts_kernel_edges_and_the_programmatic_ones_by_kernel():
    """Three kernels (two of one name, launched two ways and built two ways) behind a memcpy:
    the memcpy's edge is no kernel edge; of the two kernel edges one is programmatic, into the
    second kernel's name; each name counts its launch shapes and its codes."""
    small, large = "grid 8x1x1, block 128x1x1, shared 0", "grid 16x1x1, block 256x1x1, shared 0"
    lean = "registers 32, local 0, static shared 0"
    spilling = "registers 255, local 16, static shared 0"
    nodes = {1: ("memcpy", "", "", ""), 2: ("kernel", "norm", small, lean),
             3: ("kernel", "gemv", large, lean), 4: ("kernel", "norm", large, spilling)}
    graph = edges.summarize(nodes, [(1, 2, 0, 0), (2, 3, 1, 1), (3, 4, 0, 0)])
    assert graph["nodes"] == 4 and graph["node_types"] == {"memcpy": 1, "kernel": 3}
    assert (graph["kernel_edges"], graph["programmatic_edges"]) == (2, 1)
    assert graph["edge_kinds"] == {"programmatic, at its trigger (programmatic)": 1,
                                   "full, at its end": 1}
    assert graph["kernels"] == [
        {"name": "norm", "count": 2, "programmatic_in": 0, "launches": {small: 1, large: 1},
         "codes": {lean: 1, spilling: 1}},
        {"name": "gemv", "count": 1, "programmatic_in": 1, "launches": {large: 1},
         "codes": {lean: 1}}]
    assert edges.summarize({}, []) == {"nodes": 0, "node_types": {}, "kernel_edges": 0,
                                       "programmatic_edges": 0, "edge_kinds": {}, "kernels": []}


class _FakeLibcuda:
    """The driver calls Driver.code makes, answering from a table: attribute -> value for a
    CUfunction (cuFuncGetAttribute) and for a CUkernel on device 3 (cuKernelGetAttribute);
    an attribute missing from the table is an error (status 1)."""

    def __init__(self, values: dict[int, int], context: bool = True):
        self.values, self.context, self.calls = values, context, []

    def _answer(self, out, attribute):
        if attribute not in self.values:
            return 1
        out._obj.value = self.values[attribute]
        return 0

    def cuFuncGetAttribute(self, out, attribute, function):
        self.calls.append(("function", attribute, function.value))
        return self._answer(out, attribute)

    def cuKernelGetAttribute(self, out, attribute, kernel, device):
        self.calls.append(("kernel", attribute, kernel.value, device.value))
        return self._answer(out, attribute)

    def cuCtxGetDevice(self, out):
        if not self.context:
            return 201  # CUDA_ERROR_INVALID_CONTEXT
        out._obj.value = 3
        return 0


def test_a_kernel_s_code_is_read_from_its_function_or_else_its_library_kernel():
    """Registers (attribute 4), local bytes (3), static shared bytes (1): from the CUfunction
    where the node has one, else from the CUkernel on the context's device; a value the
    driver refuses reads "?", and without a context a library kernel is not asked at all."""
    driver = object.__new__(edges.Driver)
    driver.lib = _FakeLibcuda({4: 40, 3: 0, 1: 1024})
    assert edges.code_text(driver.code(0xF00, 0)) == "registers 40, local 0, static shared 1024"
    assert {call[0] for call in driver.lib.calls} == {"function"}
    driver.lib = _FakeLibcuda({4: 128})
    assert edges.code_text(driver.code(0, 0xBEE)) == "registers 128, local ?, static shared ?"
    assert driver.lib.calls[0] == ("kernel", 4, 0xBEE, 3)
    driver.lib = _FakeLibcuda({4: 128}, context=False)
    assert driver.code(0, 0xBEE) == {"registers": None, "local": None, "static shared": None}
    assert driver.lib.calls == []


def test_the_hook_keeps_each_graph_instantiates_it_at_capture_and_summarizes_it(monkeypatch):
    """Every CUDAGraph is made with keep_graph=True; after capture_end the graph is instantiated
    (as capture_end does without keep_graph) and read, in capture order."""
    cls = torch.cuda.CUDAGraph
    made, ended = [], []
    # the C++ graph's constructor (pybind's __init__, which takes the call's own arguments)
    monkeypatch.setattr(torch._C._CUDAGraph, "__init__",
                        lambda self, keep_graph=False: made.append(keep_graph))
    monkeypatch.setattr(cls, "capture_end", lambda self: ended.append("end"))
    monkeypatch.setattr(cls, "__init__", cls.__init__)  # the hook's own, undone after the test
    driver = SimpleNamespace(read=lambda graph: ({graph: ("kernel", "k", "", "")}, []))
    graphs: list = []
    edges.hook(driver, graphs)
    # what CUDAGraph() and CUDAGraph(keep_graph=False) run once the object exists (torch's
    # graph trees pass no arguments)
    cls.__init__(SimpleNamespace())
    cls.__init__(SimpleNamespace(), keep_graph=False)
    assert made == [True, True]
    calls = []
    graph = SimpleNamespace(instantiate=lambda: calls.append("instantiate"),
                            raw_cuda_graph=lambda: 7)
    cls.capture_end(graph)
    assert ended == ["end"] and calls == ["instantiate"]
    assert graphs == [edges.summarize({7: ("kernel", "k", "", "")}, [])]

    def broken(graph):
        raise edges.InfermeterError("cuFuncGetName failed with CUDA driver error 1")

    driver.read = broken  # a graph the driver cannot read: noted, and the run goes on
    cls.capture_end(graph)
    assert graphs[-1] == {"error": "cuFuncGetName failed with CUDA driver error 1"}


def test_a_torch_whose_graphs_cannot_be_kept_is_refused(monkeypatch):
    monkeypatch.delattr(torch.cuda.CUDAGraph, "raw_cuda_graph")
    with pytest.raises(edges.InfermeterError, match="cannot keep its graph"):
        edges.hook(SimpleNamespace(), [])


def test_without_a_gpu_or_a_command_it_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "edges.json"
    if not torch.cuda.is_available():
        status = edges.main(["--edges", str(out), "--", "generate", "--model", "debug"])
        err = capsys.readouterr().err
        assert status == 2 and err == "graph_edges: error: reading CUDA graphs needs a CUDA GPU\n"
        assert not out.exists()
    with pytest.raises(SystemExit) as stop:
        edges.main(["--edges", str(out)])
    assert stop.value.code == 2 and "after --" in capsys.readouterr().err


def test_the_edges_part_runs_batch_8_three_ways_under_the_hook():
    """open_targets.sh step-batch-edges: layer and static each compiling into an empty cache,
    then static reloading the cache static filled; each edges file named apart."""
    body = part_body("step-batch-edges")
    runs = re.search(r"for run in ([^;]*); do", body).group(1)
    assert re.findall(r'"(\d) (\d) (\w+)"', runs) == \
        [("0", "0", "layer"), ("1", "1", "static"), ("2", "1", "static")]
    (line,) = re.findall(r"python3 benchmarks/graph_edges\.py ([^\n]*)", body)
    line = line.split("||")[0].replace('"$graphs"', "static")
    args = edges.arguments().parse_args(re.sub(r'"[^"]*\$[^"]*"', "x", line).split())
    assert args.edges == "x"
    generate = build_parser().parse_args(edges.infermeter_command(args))
    assert (generate.model, generate.dtype, generate.batch_size) == ("llama-3.2-1b", "bf16", [8])
    assert generate.prefill_graphs == "static" and generate.output == "x"
