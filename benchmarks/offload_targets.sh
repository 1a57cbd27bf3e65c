#!/usr/bin/env bash
# KV offload in the loop on one GPU (issue 26's targets), Llama-3.1-8B bf16 random weights, batch 1:
#   1. reload vs recompute: prefix 8192, suffixes 128 and 1024; the whole host copy and paged host
#      copies of 16- and 256-token blocks; (b)'s TTFT against max(reload alone, suffix prefill)
#   2. decode under copy traffic: d2h, h2d and both at once, by DMA and by an SM kernel
#   3. offloaded decode at a 32,768-token context against the link's bound
# -> DIR/offload-<device>.jsonl (one Result per command; DIR: results/ by default).
# Usage: bash benchmarks/offload_targets.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
out=${1:-results}/offload-$slug.jsonl  # appended to, as the sweeps do
model=(--model llama-3.1-8b --dtype bf16 --batch-size 1 --output "$out")
python3 -m infermeter offload "${model[@]}" --prefix-len 8192 --suffix-len 128 1024 \
  --block-size 16 256 --repeats 5 --warmup 2
python3 -m infermeter offload "${model[@]}" --prefix-len 2048 --suffix-len 128 \
  --traffic d2h h2d both --traffic-method dma mapped --repeats 5
python3 -m infermeter offload "${model[@]}" --prefix-len 32768 --suffix-len 128 \
  --offloaded-decode --context 32768 --repeats 3
