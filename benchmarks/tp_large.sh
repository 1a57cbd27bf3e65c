#!/usr/bin/env bash
# Issue 9 on a host with 4 (or 8) GPUs: 70B models at tp 4 (and 8 where there are 8 GPUs).
#   kv: sizes per rank; copy: every rank moves its KV shard at once (batch 1 x 4096 tokens);
#   generate: random bf16 weights, batch 1 and 16, 512- and 4096-token caches, eager mode by
#   default (a cold compile of an 80-layer model costs minutes per shape: MODE=compiled with
#   one cache size, or one batch size, fits a 10-minute command).
# Writes results/tp-large-<device>.jsonl (or $RESULTS/...).
# Usage: [CACHES="512"] [BATCHES="1"] [MODE=compiled] [SKIP_KV_COPY=1] [RESULTS=DIR]
#        bash benchmarks/tp_large.sh [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
out=${RESULTS:-results}/tp-large-$slug.jsonl
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
models=("${@:-llama-2-70b}")  # issue 9 also names llama-3.1-70b: pass both when time allows
for tp in 4 8; do
  (( tp <= gpus )) || { echo "tp $tp: only $gpus GPUs here, not run"; continue; }
  for model in "${models[@]}"; do
    if [ -z "${SKIP_KV_COPY:-}" ]; then
      python3 -m infermeter kv --model "$model" --tp $tp --dtype bf16 --batch-size 1 16 \
        --seq-len 512 4096 --json --output "$out" > /dev/null
      timeout 300 python3 -m infermeter copy --model "$model" --tp $tp --kv-dtype bf16 \
        --batch-size 1 --seq-len 4096 --host pinned --json --output "$out" > /dev/null
    fi
    for cache in ${CACHES:-512 4096}; do
      timeout 300 python3 -m infermeter generate --model "$model" --tp $tp --dtype bf16 \
        --mode "${MODE:-eager}" --batch-size ${BATCHES:-1 16} --context $((cache - 32)) \
        --max-new-tokens 32 \
        --max-seq-len $cache --repeats 2 --warmup 1 --json --output "$out" > /dev/null
      echo "$model tp $tp cache $cache ${MODE:-eager}: done"
    done
  done
done
