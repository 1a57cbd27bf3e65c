#!/usr/bin/env bash
# The main job on one GPU, and what the trace and hf-eager comparisons need (issues 5, 7, 8):
#   1. `infermeter run --trace`: the reference setting (llama-2-7b fp16, batch 1, 512-token
#      cache): kv, copy and generate Results, report, and a decode-step breakdown from a trace
#      -> results/run-<device>/ (results.jsonl, report.md) + results/trace-<device>-summary.txt
#   2. the same generation untraced, beside transformers' eager generate (--mode hf-eager), and
#   3. traced again: tracing must not change the timed figures (it runs after them)
#      -> results/trace-check-<device>.jsonl (2 compiled Results, one traced, + the hf-eager one)
# Usage: bash benchmarks/reference_run.sh   (copies the small files to $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
slug=$(python3 -c 'from infermeter.measure.env import capture_env, device_slug; print(device_slug(capture_env()))')
run=results/run-$slug traces=/tmp/infermeter-traces check=results/trace-check-$slug.jsonl
rm -rf "$run" "$traces" "$check"
python3 -m infermeter run --out "$run" --trace "$traces"
rm -rf "$run/plots" "$run/report.html"  # binary and large; `infermeter report` remakes them
python3 -m infermeter trace "$traces/generate/trace-rank0.json" > "results/trace-$slug-summary.txt"
same=(--model llama-2-7b --dtype fp16 --prompt-len 80 --max-new-tokens 432 --max-seq-len 512
      --repeats 3 --warmup 1 --json --output "$check")
python3 -m infermeter generate "${same[@]}" --mode compiled hf-eager > /dev/null
python3 -m infermeter generate "${same[@]}" --mode compiled --trace "$traces/check" > /dev/null
if [[ -n "${OUT:-}" ]]; then
  cp "$run/results.jsonl" "$OUT/run-results.jsonl"; cp "$run/report.md" "$OUT/run-report.md"
  cp "results/trace-$slug-summary.txt" "$check" "$OUT/"
  gzip -c "$traces/generate/trace-rank0.json" > "$OUT/trace-generate.json.gz"
fi
