"""Tensor parallelism on one two-GPU host: writes results/tp-<device>.jsonl (+ summary).

    python benchmarks/tp_sweep.py --parts decode-7b decode-13b comm copy runs
    python benchmarks/tp_sweep.py --summary-only --slug nvidia-h100-80gb-hbm3
    NCCL_PROTO=LL python benchmarks/tp_sweep.py --parts comm --tag nccl-ll   # a variant's files

Parts (each under the device tool's 10-minute limit; a part run again is appended after the
earlier Results, which stay):
  decode-7b, decode-13b  Llama-2-7B / 13B, random bf16 weights, batch 1, an 80-token prompt and
        256 new tokens in a 512-token cache, compiled: `infermeter generate --tp 1` and `--tp 2`
        (the user's own command, torchrun started by it). Decode tok/s is the slowest rank's.
        Target (issue 6): 13B tp 2 >= 1.7x tp 1.
  decode-13b-one-shot, decode-13b-triton, decode-13b-triton-unfused
        13B at tp 2 only, with --tp-all-reduce one-shot (inductor's symmetric-memory kernels),
        triton or triton-unfused (engine/parallel/peer_all_reduce.py); compared with
        decode-13b's tp 1.
  decode-13b-pdl, decode-13b-no-pdl  decode-13b (tp 1 and tp 2, default all-reduce) with --pdl
        or --no-pdl (engine/kernels/pdl.py; decode-13b takes the default: on where it can run)
  comm  the collectives of one tp 2 decode step, replayed in a CUDA graph as the compiled step
        runs them: 2 all-reduces of [1, 1, dim] per layer, the embedding's and the logits'
        all-gathers; with decode-13b's TPOT this gives the all-reduce share of a step. Also
        with symmetric-memory one-shot all-reduces (--tp-all-reduce one-shot) and with the
        peer kernel (--tp-all-reduce triton, its sums checked against NCCL's) in their place.
  copy  every rank moves its own KV shard (Llama-2-13B, batch 1 x 4096 tokens bf16: 1.6 GiB per
        rank) between its GPU and pinned host memory, first each rank alone, then all at once
        (they may share host links); total GB/s together against one rank alone. Target: >= 1.8x,
        or a shared link named (each GPU's PCIe bus and NUMA node are in the Results).
  runs  ten `infermeter generate --tp 2` runs in a row (Llama-3.2-1B, 8 tokens; 1 compiled,
        then 9 eager to stay within the device budget), each start to exit under a timeout:
        every one must exit 0, none may hang.
On a host with more GPUs, CUDA_VISIBLE_DEVICES=0,1 keeps every part on two of them.
When $OUT is set, the JSONL files and the summary are copied there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("decode-7b", "decode-13b", "decode-13b-pdl", "decode-13b-no-pdl", "decode-13b-one-shot",
         "decode-13b-triton", "decode-13b-triton-unfused", "comm", "copy", "runs")
# part suffix -> --tp-all-reduce
ALL_REDUCE_PARTS = {"-one-shot": "one-shot", "-triton": "triton",
                    "-triton-unfused": "triton-unfused"}
RUN_TIMEOUT_S = 300
# What the parts run; --smoke swaps in the debug model on CPU to check the plumbing anywhere.
SETUP = {"device": "cuda", "mode": "compiled", "dtype": "bf16", "seq_len": 4096,
         "runs": ("compiled",) + ("eager",) * 9,  # a cold compile costs ~1 min a run
         "decode-7b": "llama-2-7b", "decode-13b": "llama-2-13b",
         "decode-13b-one-shot": "llama-2-13b", "decode-13b-triton": "llama-2-13b",
         "decode-13b-triton-unfused": "llama-2-13b",
         "decode-13b-pdl": "llama-2-13b", "decode-13b-no-pdl": "llama-2-13b",
         "runs_model": "llama-3.2-1b",
         "copy_model": "llama-2-13b", "copy_hosts": "pinned",
         "decode_args": ("--prompt-len", "80", "--max-new-tokens", "256", "--max-seq-len", "512",
                         "--repeats", "5", "--warmup", "1")}
SMOKE = {"device": "cpu", "mode": "eager", "dtype": "fp32", "runs": ("eager",) * 2, "seq_len": 64,
         "decode-7b": "debug", "decode-13b": "debug", "runs_model": "debug",
         "copy_model": "debug", "copy_hosts": "pageable",
         "decode_args": ("--prompt-len", "8", "--max-new-tokens", "16", "--max-seq-len", "32",
                         "--repeats", "2", "--warmup", "0", "--no-roofline")}


def _slug() -> str:
    from infermeter.measure.env import capture_env, device_slug

    return device_slug(capture_env())


def _child_env() -> dict[str, str]:
    from infermeter.launch import CHILD_ENV

    threads = str(max(1, (os.cpu_count() or 2) // 2))
    return {"OMP_NUM_THREADS": threads, **os.environ, **CHILD_ENV,
            "PYTHONPATH": str(ROOT / "src")}


def append_part(path: Path, lines: list[str]) -> None:
    """Add a part's new lines after every line the file holds (atomic): an earlier run's Results
    stay, so a figure the docs cite never disappears; the summary reads the latest."""
    old = path.read_text().splitlines() if path.exists() else []
    from infermeter.measure.result import atomic_write

    atomic_write(path, "".join(f"{line}\n" for line in old + lines).encode())


# ---- decode: the user's command at tp 1 and tp 2 -------------------------------------------------
def generate_cmd(model: str, tp: int, out: Path, *extra: str, mode: str = "") -> list[str]:
    return [sys.executable, "-m", "infermeter", "generate", "--model", model, "--dtype",
            SETUP["dtype"], "--device", SETUP["device"], "--mode", mode or SETUP["mode"],
            "--tp", str(tp), "--json", "--output", str(out), *extra]


def part_decode(model: str, jsonl: Path, part: str, trace: Path | None = None) -> None:
    """tp 1 and tp 2; a "-one-shot" or "-triton" part runs tp 2 only, with that --tp-all-reduce
    (its ratio is taken against the plain part's tp 1). trace: a folder for each tp 2 run's
    profiler traces (--trace; the step's breakdown goes in the Result too)."""
    lines = []
    all_reduce = next((kind for suffix, kind in ALL_REDUCE_PARTS.items()
                       if part.endswith(suffix)), None)
    for tp in (2,) if all_reduce else (1, 2):
        out = jsonl.with_name(f".{part}-tp{tp}.jsonl")
        out.unlink(missing_ok=True)
        extra = ("--tp-all-reduce", all_reduce) if all_reduce else ()
        extra += ("--no-pdl",) if part.endswith("-no-pdl") else \
            ("--pdl",) if part.endswith("-pdl") else ()
        if trace and tp > 1:
            extra += ("--trace", str(trace / part))
        cmd = generate_cmd(model, tp, out, *SETUP["decode_args"], *extra)
        start = time.monotonic()
        run = subprocess.run(cmd, env=_child_env(), timeout=540, cwd=ROOT,
                             stdout=subprocess.DEVNULL)  # the Results go to --output
        print(f"{model} tp {tp}: exit {run.returncode} in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
        for line in out.read_text().splitlines() if out.exists() else []:
            result = json.loads(line)
            result["config"]["tp_sweep"] = part
            lines.append(json.dumps(result))
        out.unlink(missing_ok=True)
    append_part(jsonl, lines)


# ---- runs: start to exit, ten times --------------------------------------------------------------
def runs_result(rows: list[dict]) -> Any:
    """The runs part as a Result: which machine, which command, every run's exit."""
    from infermeter.measure.env import capture_env
    from infermeter.measure.result import Result
    from infermeter.specs.presets import PRESETS

    clean = sum(r["exit_code"] == 0 and r["result_written"] for r in rows)
    config = {"benchmark": "tp_runs", "tp": 2, "model": SETUP["runs_model"],
              "modes": list(SETUP["runs"]), "max_new_tokens": 8}
    return Result("generate", PRESETS[SETUP["runs_model"]].to_dict(), config, capture_env(),
                  {"runs": rows, "clean_runs": clean, "hung_runs":
                   sum(r["exit_code"] is None for r in rows)})


def part_runs(path: Path) -> None:
    from infermeter.measure.result import write_json

    rows = []
    for i, mode in enumerate(SETUP["runs"]):
        out = path.with_name(f".runs-{i}.jsonl")
        cmd = generate_cmd(SETUP["runs_model"], 2, out, "--max-new-tokens", "8", "--repeats", "1",
                           "--warmup", "0", "--no-roofline", mode=mode)
        start = time.monotonic()
        try:
            run = subprocess.run(cmd, env=_child_env(), timeout=RUN_TIMEOUT_S, cwd=ROOT,
                                 capture_output=True, text=True)
            code, tail = run.returncode, run.stderr[-2000:]
        except subprocess.TimeoutExpired as err:
            code, tail = None, f"timed out after {RUN_TIMEOUT_S} s: {str(err.stderr)[-2000:]}"
        rows.append({"run": i, "mode": mode, "exit_code": code,
                     "wall_s": round(time.monotonic() - start, 2),
                     "result_written": out.exists(), "stderr_tail": tail})
        out.unlink(missing_ok=True)
        print(f"run {i}: exit {code} in {rows[-1]['wall_s']} s", file=sys.stderr, flush=True)
        write_json(path, runs_result(rows))  # after each: a cut run keeps these


# ---- workers under torchrun (comm, copy) ---------------------------------------------------------
def run_workers(worker: str, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "--worker", worker, "--worker-out", str(out),
           "--model", SETUP["copy_model"], "--device", SETUP["device"],
           "--seq-len", str(SETUP["seq_len"]), "--copy-hosts", SETUP["copy_hosts"], *extra]
    subprocess.run(cmd, env=_child_env(), timeout=540, cwd=ROOT, check=True)


# The comm part's variants, each in its own torchrun (a variant that crashes, as one-shot's replay
# did on 2026-11-26 (commit db6ce97) and the peer kernel's once (commit d64dbfa), leaves the
# others' figures).
COMM_VARIANTS = ("eager", "graph", "triton_graph", "one_shot_graph")


def worker_comm(out: Path, model: str, variant: str) -> None:
    """Time one decode step's collectives (bf16, batch 1) inside a CUDA graph, as compiled;
    the variant's figures are added to those already in `out`."""
    import torch

    from infermeter.engine.parallel.group import init_distributed, teardown
    from infermeter.engine.parallel.sharding import all_gather_last, all_reduce
    from infermeter.specs.presets import PRESETS

    spec, parallel = PRESETS[model], init_distributed("cuda")
    x = torch.randn(1, 1, spec.dim, dtype=torch.bfloat16, device=parallel.device)
    emb = torch.randn(1, 1, spec.dim // parallel.world, dtype=torch.bfloat16,
                      device=parallel.device)
    logits = torch.randn(1, 1, spec.vocab_size // parallel.world, dtype=torch.bfloat16,
                         device=parallel.device)

    def step() -> None:  # one decode step's collectives, in the order the model runs them
        outs = [all_gather_last(emb, parallel.group, parallel.world)]
        outs += [all_reduce(x, parallel.group) for _ in range(2 * spec.n_layers)]
        outs.append(all_gather_last(logits, parallel.group, parallel.world))
        for out in outs:  # funcol results are waited for where they are used: use them
            torch.add(out, 0)

    def one_shot() -> Callable[[], None]:
        """The same step with symmetric-memory one-shot all-reduces (--tp-all-reduce one-shot:
        what inductor lowers the compiled step's all-reduces to); the all-gathers stay NCCL's."""
        import torch.distributed._symmetric_memory as symm_mem

        name = parallel.group.group_name
        symm_mem.enable_symm_mem_for_group(name)
        buffer = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buffer, name)
        buffer.copy_(x)

        def run() -> None:
            outs = [all_gather_last(emb, parallel.group, parallel.world)]
            outs += [torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", name)
                     for _ in range(2 * spec.n_layers)]
            outs.append(all_gather_last(logits, parallel.group, parallel.world))
            for out in outs:
                torch.add(out, 0)
        return run

    def peer() -> Callable[[], None]:
        """The same step with the peer kernel's all-reduces (--tp-all-reduce triton), one call
        site per all-reduce as in the model; first checks one sum against NCCL's."""
        from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce

        sites = 2 * spec.n_layers
        kernel = PeerAllReduce.for_group(parallel.group, parallel.device, sites)
        mine = torch.randn(x.shape, dtype=x.dtype, device=x.device,
                           generator=torch.Generator(x.device).manual_seed(parallel.rank))
        timings["triton_equals_nccl"] = torch.equal(kernel(mine, 0),
                                                    all_reduce(mine, parallel.group))

        def run() -> None:
            outs = [all_gather_last(emb, parallel.group, parallel.world)]
            outs += [kernel(x, site) for site in range(sites)]
            outs.append(all_gather_last(logits, parallel.group, parallel.world))
            for out in outs:
                torch.add(out, 0)
        return run

    timings: dict[str, object] = {}
    graphs = []

    def write() -> None:
        """Rank 0 writes what is timed so far: a variant that kills the process (the 2xH100
        run before commit 0c7c257 lost the whole part that way) leaves the ones before it."""
        if parallel.rank != 0:
            return
        from infermeter.measure.env import capture_env
        from infermeter.measure.result import Result, write_json

        previous = json.loads(out.read_text())["metrics"] if out.exists() else {}
        config = {"benchmark": "tp_comm", "model": model, "tp": parallel.world, "dtype": "bfloat16",
                  "batch_size": 1, "steps_timed": 50,  # NCCL_* settings tried (e.g. PROTO):
                  "nccl_env": {k: v for k, v in sorted(os.environ.items())
                               if k.startswith("NCCL_")}}
        write_json(out, Result("generate", spec.to_dict(), config, capture_env(),
                               {**previous, **timings,
                                "all_reduces_per_step": 2 * spec.n_layers}))

    variants = {"eager": lambda: step, "graph": lambda: step, "triton_graph": peer,
                "one_shot_graph": one_shot}  # COMM_VARIANTS, one per process
    how, make = variant, variants[variant]
    print(f"rank {parallel.rank}: comm {how}", file=sys.stderr, flush=True)
    try:
        fn = make()
        if how != "eager":  # as the compiled decode step replays them: no launch overhead
            fn()  # once outside the capture (symmetric memory's first use sets it up)
            torch.cuda.synchronize()
            graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graphs[-1]):
                fn()
            fn = graphs[-1].replay
        for _ in range(5):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        timings[f"{how}_ms_per_step"] = start.elapsed_time(end) / 50
    except Exception as err:  # a capture NCCL refuses: keep the eager number, say why
        timings[f"{how}_error"] = f"{type(err).__name__}: {err}"[:300]
    write()
    # A graph holding NCCL kernels must go before its communicator: on an H100 host both ranks
    # aborted (SIGABRT) in teardown, after writing these timings, when it was left alive.
    del graphs
    torch.cuda.synchronize()
    teardown()


def worker_copy(out: Path, model: str, seq_len: int, device: str, hosts: str) -> None:
    """Each rank's KV shard copied alone (one rank after the other), then all ranks at once."""
    import torch.distributed as dist

    from infermeter.copy.job import CopyRequest, run_copy
    from infermeter.engine.parallel.group import init_distributed, teardown
    from infermeter.engine.parallel.sharding import ShardPlan
    from infermeter.measure.ranks import gather_objects
    from infermeter.specs.presets import PRESETS

    spec, parallel = PRESETS[model], init_distributed(device)
    plan = ShardPlan(spec, parallel.rank, parallel.world)
    # The rank's cache has exactly the shape of a model with its heads: kvsize's per-rank bytes.
    # Same name as the model: the report makes one column of a device x model x tp.
    shard = spec.with_updates(n_heads=plan.heads[1], n_kv_heads=plan.kv_heads[1])
    request = CopyRequest(shard, (1,), (seq_len,), "bf16", layouts=("engine", "contiguous"),
                          hosts=(hosts,), directions=("d2h", "h2d"),
                          methods=("per-tensor", "staged"), repeats=10, warmup=2,
                          device=device)
    mine = []
    for phase, active in [(f"alone-{r}", {r}) for r in range(parallel.world)] + [
            ("together", set(range(parallel.world)))]:
        dist.barrier()  # everyone starts a phase together
        if parallel.rank in active:
            for result in run_copy(request):
                result.config.update(tp_sweep="copy", phase=phase, rank=parallel.rank,
                                     tp=parallel.world)
                mine.append(result.to_json())
        dist.barrier()
    everything = gather_objects(mine)
    if parallel.rank == 0:
        out.write_text("".join(f"{line}\n" for lines in everything for line in lines))
    teardown()


def _note_comm_failure(out: Path, variant: str, code: int) -> None:
    print(f"comm {variant}: the workers exited {code}", file=sys.stderr, flush=True)
    if out.exists():
        from infermeter.measure.result import atomic_write

        data = json.loads(out.read_text())
        data["metrics"][f"{variant}_error"] = f"the worker processes exited {code}"
        atomic_write(out, (json.dumps(data, indent=2) + "\n").encode())


def run_part(part: str, smoke: bool, folder: Path, slug: str, jsonl: Path) -> None:
    if part.startswith("decode-"):  # tp 2 traced: where a step goes (not copied to $OUT)
        part_decode(SETUP[part], jsonl, part, None if smoke else folder / ".traces")
    elif part == "comm":
        if not smoke:  # CUDA events and graphs only
            out = folder / f"{slug}-comm.json"
            out.unlink(missing_ok=True)
            for variant in COMM_VARIANTS:
                try:
                    run_workers("comm", out, "--variant", variant)
                except subprocess.CalledProcessError as err:
                    _note_comm_failure(out, variant, err.returncode)
    elif part == "copy":
        tmp = folder / f".{slug}-copy.jsonl"
        run_workers("copy", tmp)
        append_part(jsonl, tmp.read_text().splitlines())
        tmp.unlink()
    elif part == "runs":
        part_runs(folder / f"{slug}-runs.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--tag", help="file name part, tp-TAG-<device>*: a variant (e.g. an "
                        "NCCL_PROTO setting for the comm part) beside the standard files")
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--slug", help="the device part of the file names (default: this "
                        "machine's), e.g. nvidia-h100-80gb-hbm3 for --summary-only on a CPU")
    parser.add_argument("--worker", choices=("comm", "copy"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=COMM_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="the debug model on CPU (eager, gloo): checks the script only")
    parser.add_argument("--model", default="llama-2-13b", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--copy-hosts", default="pinned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "comm":
        worker_comm(Path(args.worker_out), args.model, args.variant)
        return 0
    if args.worker == "copy":
        worker_copy(Path(args.worker_out), args.model, args.seq_len, args.device,
                    args.copy_hosts)
        return 0
    if args.smoke:
        SETUP.update(SMOKE)
    from tp_summary import summarize  # benchmarks/tp_summary.py, beside this file

    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    device = args.slug or _slug()
    slug = f"tp-{args.tag}-{device}" if args.tag else f"tp-{device}"
    jsonl = folder / f"{slug}.jsonl"
    for part in [] if args.summary_only else args.parts:
        start = time.monotonic()
        try:
            run_part(part, args.smoke, folder, slug, jsonl)
        except (subprocess.SubprocessError, OSError) as err:  # the other parts still run
            print(f"part {part} failed: {err}", file=sys.stderr, flush=True)
        print(f"part {part}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    text = summarize(folder, slug)
    print(text)
    (folder / f"{slug}-summary.txt").write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        for path in folder.glob(f"{slug}*"):
            target = Path(os.environ["OUT"]) / path.name
            if target.resolve() != path.resolve():  # --results $OUT: already there
                shutil.copy(path, target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
