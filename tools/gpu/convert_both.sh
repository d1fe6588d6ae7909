#!/usr/bin/env bash
# usage: S1=300 S2=300 LIMIT=520 bash tools/gpu/convert_both.sh   (again to resume an interrupted pair)
set -u
source "$(dirname "$0")/env.sh"
NOEVAL="--set eval.tasks= --set eval.passkey.contexts= --set eval.bench.contexts="  # this script measures on its own: no eval after training
mkdir -p /tmp/runs
dequantise_teacher
for t in mla gateswa; do
  if [ -d /tmp/runs/$t/checkpoints ] && [ ! -f /tmp/runs/$t/summary.json ]; then
    args="/tmp/runs/$t --resume"
  else
    args="recipes/smollm2-$t.yaml --out /tmp/runs/$t --set data.files=$W --set stage1.steps=${S1:-300}
          --set stage2.steps=${S2:-300} --set stage1.warmup=30 --set stage2.warmup=30 --set checkpoint_every=100
          --set stage2.batch_size=4 --set stage2.grad_accum=4 $NOEVAL"
  fi
  timeout -s TERM "${LIMIT:-520}" python -m attnedit convert $args --progress lines > /tmp/runs/$t.log 2>&1 &
done
wait
for t in mla gateswa; do
  echo "=== $t"; grep -v "^\s*$" /tmp/runs/$t.log | tail -n 30
  cp /tmp/runs/$t.log "$OUT/$t-convert.log" 2>/dev/null
done
