#!/usr/bin/env bash
# Decode/prefill speed on the GPU machine (after ../shared/device/pack.sh chunks are unpacked):
#   bash tools/gpu/bench_decode.sh [contexts] [batches]
# 1. kernel check (Triton decode and FlexAttention sliding prefill vs PyTorch references, timings vs HBM bound)
# 2. SmolLM2 edited to GateSWA (shipped GPU recipe's settings) and MLA (default ranks), teacher-initialised
#    (speed does not depend on training), then `attnedit bench` for each: student, teacher on the same
#    engine, teacher on stock transformers static cache + compile.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CTX=${1:-2048,8192}; BATCH=${2:-1,16,64}
python tools/gpu/check_kernels.py 2>&1 | tee "$OUT/kernels.log"
[ -d /tmp/gs ] || python -m attnedit edit smollm2-135m --target gateswa --set init=teacher --set window=512 --set sink=4 --set full_layers=every:6 --out /tmp/gs > /dev/null
[ -d /tmp/mla ] || python -m attnedit edit smollm2-135m --target mla --set init=teacher --out /tmp/mla > /dev/null
for m in ${MODELS:-gs mla}; do
  stock=""; [ "$m" = mla ] && [ -z "${STOCK_BOTH:-}" ] && stock="--no-stock"
  python -m attnedit bench /tmp/$m --teacher smollm2-135m --contexts "$CTX" --batches "$BATCH" --decode-tokens 32 \
    --repeats 3 $stock --save "$OUT/bench-$m.json" 2> "$OUT/bench-$m.log" | tee "$OUT/bench-$m.txt"
done
