#!/usr/bin/env bash
# Decode/prefill speed on the GPU machine (after ../shared/device/pack.sh chunks are unpacked):
#   bash tools/gpu/bench_decode.sh
# 1. kernel check (Triton decode and FlexAttention sliding prefill vs PyTorch references, timings vs HBM bound)
# 2. SmolLM2 edited to GateSWA (the shipped GPU recipe's settings) and MLA (default ranks), teacher-initialised
#    (decode speed does not depend on the trained values), then `attnedit bench` for each over the grid,
#    student next to the teacher on the same engine (--no-stock: the stock path compiles per shape, ~2 min each)
# 3. the stock transformers teacher (static cache + compile) at the STOCK_CTX x STOCK_BATCH cells, in the same
#    run as each student there.
# env: CTX, BATCH (grid), STOCK_CTX, STOCK_BATCH, STOCK_MODELS (default "gs mla"), REPEATS
set -uo pipefail
export ATTNEDIT_SMOLLM2_GGUF=${ATTNEDIT_SMOLLM2_GGUF:-/tmp/attnedit-cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}  # where pack.sh unpacks the teacher
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python tools/gpu/check_kernels.py 2>&1 | tee "$OUT/kernels.log"
[ -d /tmp/gs ] || python -m attnedit edit smollm2-135m --target gateswa --set init=teacher --set window=512 --set sink=4 --set full_layers=every:6 --out /tmp/gs > /dev/null 2>&1
[ -d /tmp/mla ] || python -m attnedit edit smollm2-135m --target mla --set init=teacher --out /tmp/mla > /dev/null 2>&1
for m in gs mla; do
  python -m attnedit bench /tmp/$m --teacher smollm2-135m --contexts "${CTX:-2048,8192}" --batches "${BATCH:-1,16,64}" \
    --decode-tokens 32 --repeats "${REPEATS:-2}" --no-stock --save "$OUT/bench-$m.json" 2> "$OUT/bench-$m.log" | tee "$OUT/bench-$m.txt"
done
for m in ${STOCK_MODELS:-gs mla}; do
  python -m attnedit bench /tmp/$m --teacher smollm2-135m --contexts "${STOCK_CTX:-8192}" --batches "${STOCK_BATCH:-64}" \
    --decode-tokens 32 --repeats "${REPEATS:-2}" --save "$OUT/bench-$m-stock.json" 2> "$OUT/bench-$m-stock.log" | tee "$OUT/bench-$m-stock.txt"
done
