#!/usr/bin/env bash
# KV offload in the loop on one GPU (issue 26's targets), Llama-3.1-8B bf16 random weights, batch 1,
# one target a command (each fits one 10-minute command on an H200):
#   reload    reload vs recompute: prefix 8192, suffixes 128 and 1024; the whole host copy and
#             paged host copies of 16- and 256-token blocks, each reloaded both ways (a DMA
#             per block, and a gather kernel per layer's K or V through the pool's mapping);
#             (b)'s TTFT against max(reload alone, suffix prefill)
#   traffic   decode under copy traffic: d2h, h2d and both at once, by DMA and by an SM kernel
#   decode    offloaded decode at a 32,768-token context against the link's bound; `infermeter
#             offload` always times its reload-vs-recompute cases too (--prefix-len is required,
#             --offloaded-decode adds to them), here the 32k prefix's
# -> DIR/offload-<device>.jsonl (one Result per command, appended; DIR: results/ by default).
# Usage: bash benchmarks/offload_targets.sh {reload|traffic|decode} [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  reload|traffic|decode) ;;
  *) echo "usage: bash benchmarks/offload_targets.sh {reload|traffic|decode} [DIR]" >&2
     exit 2 ;;
esac
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
out=${2:-results}/offload-$slug.jsonl
mkdir -p "$(dirname "$out")"
model=(--model llama-3.1-8b --dtype bf16 --batch-size 1 --output "$out")
case "$1" in
  reload)
    python3 -m infermeter offload "${model[@]}" --prefix-len 8192 --suffix-len 128 1024 \
      --block-size 16 256 --paged-copy dma mapped --repeats 5 --warmup 2 ;;
  traffic)
    python3 -m infermeter offload "${model[@]}" --prefix-len 2048 --suffix-len 128 \
      --traffic d2h h2d both --traffic-method dma mapped --repeats 5 ;;
  decode)
    python3 -m infermeter offload "${model[@]}" --prefix-len 32768 --suffix-len 128 \
      --offloaded-decode --context 32768 --repeats 3 \
      --trace "${2:-results}/traces-offload-decode-$slug" ;;
esac
