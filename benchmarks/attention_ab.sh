#!/usr/bin/env bash
# Same-machine A/B of the compiled step's decode attention at batch 1, bf16: math against the
# Triton split-KV kernel (engine/attention.py's AUTO_TRITON_MIN_BATCH rests on it).
#   bash benchmarks/attention_ab.sh            # one GPU: llama-2-13b and llama-2-7b, tp 1
#   TP=2 bash benchmarks/attention_ab.sh       # a 2-GPU host: llama-2-13b at tp 2
#   BATCHES="4 8 16" MODELS=llama-2-7b bash benchmarks/attention_ab.sh   # where auto switches
# An 80-token prompt, 256 new tokens, 512-token cache. Appends one Result per run to
# $RESULTS/attention-ab[-tp2]-<device>.jsonl (RESULTS defaults to results/) and prints TPOTs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TP=${TP:-1}
RESULTS=${RESULTS:-results}
slug=$(python -c "from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))")
if [ "$TP" = 1 ]; then
  models=${MODELS:-llama-2-13b llama-2-7b}; name="attention-ab-$slug"
  extra=(--repeats 3 --no-roofline)
else
  models=${MODELS:-llama-2-13b}; name="attention-ab-tp$TP-$slug"; extra=(--tp "$TP" --repeats 5)
fi
mkdir -p "$RESULTS"
for model in $models; do
 for batch in ${BATCHES:-1}; do
  for attention in math triton; do
    part=$(mktemp)
    timeout 240 python -m infermeter generate --model "$model" --dtype bf16 --device cuda \
      --mode compiled --prompt-len 80 --max-new-tokens 256 --max-seq-len 512 --warmup 1 \
      --batch-size "$batch" --decode-attention "$attention" "${extra[@]}" --json \
      --output "$part" >/dev/null
    cat "$part" >> "$RESULTS/$name.jsonl"
    python -c "import json, sys; r = json.loads(open(sys.argv[1]).readline()); \
print(sys.argv[2], 'batch', r['config']['batch_size'], r['config']['decode_attention'], \
      round(r['metrics']['tpot_ms']['p50'], 3), 'ms')" "$part" "$model"
    rm -f "$part"
  done
 done
done
