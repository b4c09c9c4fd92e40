#!/usr/bin/env bash
# Decode and time to first token with a float, int8 and int4 KV cache at long context, on the
# 4096-wide random LLaMA (2 layers, 32 heads of 128, vocabulary 32000; weights W4 g128 symmetric,
# lrq's CPU kernels), prompts of 512, 2048 and 4096 tokens, one thread, all three graphs in one run
# per prompt (lrq bench --compare). By hand, from the repository root:
#
#     bash benchmarks/kv_cache_speed.sh runs/kv-speed
#
# The int8 / int4 graphs attend with ai.lrq.cpu::QuantizedCacheAttention (--cpu-kernels); the
# float graph with onnxruntime's GroupQueryAttention. Writes OUT/p{512,2048,4096}.json.
set -euo pipefail
out=${1:?usage: kv_cache_speed.sh OUT [NEW_TOKENS]}
new=${2:-16}
mkdir -p "$out"
[ -d "$out/model" ] || python benchmarks/random_llama.py -o "$out/model" --layers 2 --positions 4608
for kv in none int8 int4; do
  cache=(); [ "$kv" != none ] && cache=(--kv-cache "$kv")
  [ -d "$out/w4-$kv" ] || lrq -q calibrate "$out/model" -o "$out/w4-$kv" --method rtn --wbits 4 --group-size 128 \
    --symmetric --nsamples 2 --seq-len 32 "${cache[@]}"
  [ -f "$out/w4-$kv.onnx" ] || lrq export "$out/w4-$kv" --onnx "$out/w4-$kv.onnx" --with-past --cpu-kernels --no-verify
done
for prompt in 512 2048 4096; do
  lrq bench --decode --compare "$out/w4-none.onnx" "$out/w4-int8.onnx" "$out/w4-int4.onnx" --prompt-len "$prompt" \
    --new-tokens "$new" --threads 1 --iterations 1 --export-json "$out/p$prompt.json" --force
done
