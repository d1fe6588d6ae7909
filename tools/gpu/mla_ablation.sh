#!/usr/bin/env bash
# MLA ablations at the budget of convert_both.sh (300 + 300 steps), two at once on one GPU:
#   mla-teacher: init=teacher, stage 1 + stage 2      mla-s2only: init=random, stage 2 only
# then WikiText-2 perplexity of each next to the teacher, and a bench of one (speed does not depend on weights).
set -u
export ATTNEDIT_SMOLLM2_GGUF=${ATTNEDIT_SMOLLM2_GGUF:-/tmp/attnedit-cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}  # where pack.sh unpacks the teacher
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/tmp/attnedit-cache/extra/wikipedia-en-2019-00000-of-00008.jsonl.xz
COMMON="--set data.files=$W --set stage1.steps=300 --set stage2.steps=300 --set stage1.warmup=30 --set stage2.warmup=30
        --set checkpoint_every=100 --set stage2.batch_size=4 --set stage2.grad_accum=4 --progress lines
        --set eval.tasks= --set eval.passkey.contexts= --set eval.bench.contexts="  # measured below, not by convert
mkdir -p /tmp/runs
if [ "${1:-convert}" = convert ]; then
  python -c "from attnedit.teachers import local_path; local_path('smollm2-135m')"
  timeout -s TERM 530 python -m attnedit convert recipes/smollm2-mla-2k.yaml --out /tmp/runs/mla-teacher $COMMON \
    --set target_args.init=teacher > /tmp/runs/mla-teacher.log 2>&1 &
  [ -n "${ONLY_TEACHER:-}" ] || timeout -s TERM 530 python -m attnedit convert recipes/smollm2-mla-2k.yaml \
    --out /tmp/runs/mla-s2only $COMMON --set stage1.steps=0 > /tmp/runs/mla-s2only.log 2>&1 &
  wait
  for t in mla-teacher mla-s2only; do
    [ -f /tmp/runs/$t.log ] && { echo "=== $t"; tail -n 6 /tmp/runs/$t.log; cp /tmp/runs/$t/summary.json "$OUT/$t-summary.json"; }
  done
else
  D=/tmp/shared-data; mkdir -p $D/wikitext-2-raw; cp /tmp/attnedit-cache/extra/wiki.test.raw $D/wikitext-2-raw/
  for t in mla-teacher mla-s2only; do
    [ -d /tmp/runs/$t/model ] || continue
    python -m attnedit eval /tmp/runs/$t/model --teacher smollm2-135m --tasks wikitext2 --data-dir $D \
      --save "$OUT/$t-eval.json" > /tmp/runs/$t.eval.log 2>&1 &
  done
  wait
  python -m attnedit bench /tmp/runs/mla-teacher/model --teacher smollm2-135m --contexts 1024,4096,8192 \
    --batches 1,16,64 --save "$OUT/mla-bench.json" 2>&1 | tail -n 14
  for t in mla-teacher mla-s2only; do [ -f /tmp/runs/$t.eval.log ] && { echo "=== $t"; tail -n 8 /tmp/runs/$t.eval.log; }; done
fi
