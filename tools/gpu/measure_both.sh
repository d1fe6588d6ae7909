#!/usr/bin/env bash
# usage: bash tools/gpu/measure_both.sh   (after convert_both.sh has written /tmp/runs/{mla,gateswa}/model)
set -u
export ATTNEDIT_SMOLLM2_GGUF=${ATTNEDIT_SMOLLM2_GGUF:-/tmp/attnedit-cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}  # where pack.sh unpacks the teacher
D=/tmp/shared-data; mkdir -p $D/wikitext-2-raw; cp /tmp/attnedit-cache/extra/wiki.test.raw $D/wikitext-2-raw/
T="--teacher smollm2-135m"
for t in mla gateswa; do  # quality: concurrent is fine, nothing here is timed
  (python -m attnedit eval /tmp/runs/$t/model $T --tasks wikitext2 --data-dir $D --save /tmp/runs/$t/eval.json
   python -m attnedit passkey /tmp/runs/$t/model $T --contexts 1024,4096,8192 --save /tmp/runs/$t/passkey.json
  ) > /tmp/runs/$t.quality.log 2>&1 &
done
wait
for t in mla gateswa; do  # speed: one at a time, alone on the GPU
  python -m attnedit bench /tmp/runs/$t/model $T --contexts 1024,4096,8192 --batches 1,16,64 \
    --save /tmp/runs/$t/bench.json > /tmp/runs/$t.bench.log 2>&1
  python -m attnedit report /tmp/runs/$t > /tmp/runs/$t.report.log 2>&1
  (cd /tmp/runs/$t && tar czf "$OUT/$t.tgz" report.md *.png *.json metrics.jsonl recipe.yaml ../$t.*.log 2>/dev/null)
  echo "=== $t"; tail -n 12 /tmp/runs/$t.quality.log; tail -n 25 /tmp/runs/$t.bench.log
done
