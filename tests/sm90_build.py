"""Building a kernel's real launch for an H100 (sm_90) with no GPU here.

The ops' launches are recorded instead of run (`recorded_launches`), typed as inductor types a
user kernel's launch (`inductor_signature`), then compiled by Triton for sm_90 (`sm90_binary`):
ptxas ships with Triton, so the GPU path's type and shape rules are checked on the CPU, and a
test can read the IR of each stage (`.asm["ttgir"]`, `.asm["ptx"]`).
"""

from __future__ import annotations

import torch

TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                torch.int64: "*i64", torch.int32: "*i32"}

# Launch keywords that are compile options, not kernel arguments (inductor moves them to a Config)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


def launch_recorder(launches: list):
    """A stand-in for torch.library.wrap_triton (or pdl.direct): kernel[grid](*args, **kwargs)
    appends (kernel, args, kwargs) to `launches` and runs nothing."""
    def wrap(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))
        return Grid()
    return wrap


def recorded_launches(monkeypatch, call) -> list:
    """Run call() with torch.library.wrap_triton replaced by a recorder: the (kernel, args,
    constexpr kwargs) each op really launches with, on CPU tensors, nothing executed."""
    launches = []
    monkeypatch.setattr(torch.library, "wrap_triton", launch_recorder(launches))
    call()
    return launches


def inductor_signature(kernel, args: tuple, constants: dict) -> dict:
    """The signature inductor gives a user kernel's launch: a tensor is a pointer to its dtype,
    an int i32, and a Python float fp64 (what it does; a float runtime argument made the split-
    KV kernel's scores float64 on the first H100 run)."""
    names = [p.name for p in kernel.params]
    def typed(value):
        if isinstance(value, torch.Tensor):
            return TRITON_TYPES[value.dtype]
        return "fp64" if isinstance(value, float) else "i32"
    signature = {name: typed(value) for name, value in zip(names, args, strict=False)}
    signature.update(dict.fromkeys(constants, "constexpr"))
    return {name: signature[name] for name in names if name in signature}  # the kernel's order


def sm90_binary(kernel, args, kwargs):
    """One recorded launch built for sm_90 as Triton would build it at that launch (typed as
    inductor types it): the compiled kernel, its IR of each stage in .asm, its options in
    .metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = dict(kwargs)
    options = {k: constants.pop(k) for k in LAUNCH_OPTIONS if k in constants}
    signature = inductor_signature(kernel, args, constants)
    names = list(signature)
    where = {(names.index(name),): value for name, value in constants.items()}
    # What the launch specialises on: a tensor's address (a GPU allocation's: a multiple of 16)
    # and an int that is a multiple of 16 are marked divisible by 16, so the loads the GPU
    # runs are vectorised here too (without it a build's registers and spills are another
    # binary's)
    attrs = {(index,): [["tt.divisibility", 16]] for index, value in enumerate(args)
             if index < len(names) and names[index] not in constants
             and (isinstance(value, torch.Tensor)
                  or (type(value) is int and value != 0 and value % 16 == 0))}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=where,
                                    attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def sm90_registers(ptx: str, tmp_path) -> tuple[int, int]:
    """(registers a thread, spilled bytes stored and loaded) of a kernel's PTX, as the ptxas that
    Triton builds sm_90 code with reports them (`ptxas -v`): spills put a kernel's values in
    local memory, and registers x threads per program bound how many programs an SM holds."""
    import re
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(source),
                             "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    registers = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    assert len(registers) == 1 and len(spills) == 2, text  # one kernel's report, read whole
    return int(registers[0]), sum(int(n) for n in spills)
