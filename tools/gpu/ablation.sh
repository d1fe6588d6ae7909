#!/usr/bin/env bash
# Issue 11: conversions at equal tokens, run side by side on one GPU, each evaluated next to the teacher
# by convert's own eval step: WikiText-2 perplexity at 2k and 8k, passkey at 2k/4k/8k x 5 depths (no
# harness tasks: the GPU machine has no lm_eval; no bench: the runs share the GPU, and decode speed does
# not depend on the weights).
# usage: [S1=300] [S2=300] [LIMIT=540] bash tools/gpu/ablation.sh NAME=RECIPE[+KEY=VALUE...] ...
#   settings are separated by '+' (a value may hold commas: eval.ppl_context=2048,8192); e.g. the full-layer
#   choice (docs/results.md):
#   bash tools/gpu/ablation.sh gateswa-every=recipes/smollm2-gateswa.yaml+target_args.full_layers=every:6 \
#        gateswa-auto=recipes/smollm2-gateswa.yaml+target_args.full_layers=auto:5
# Run it again with the same arguments, on the same warm machine, to resume runs that the time limit stopped
# (the checkpoints stay in /tmp/runs there; on a fresh machine every run starts again). Each run's JSON, log,
# report and recipe land in /tmp/runs/NAME/ (all runs in $OUT/runs.tgz); `attnedit report A B --out F.md` compares them.
# Many runs at once share the host's cores: each gets a few threads for its compiles and CPU work.
set -u
source "$(dirname "$0")/env.sh"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
shared_data   # wikitext-2-raw/ for the perplexity
[ $# -ge 1 ] || { echo "usage: bash tools/gpu/ablation.sh NAME=RECIPE[+KEY=VALUE...] ..." >&2; exit 2; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/runs
EVAL="--set eval.tasks=wikitext2 --set eval.ppl_context=2048,8192 --set eval.passkey.contexts=2048,4096,8192 --set eval.bench.contexts="
dequantise_teacher
names=()
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}; recipe=${rest%%+*}; names+=("$name")
  extra=""; [ "$rest" != "$recipe" ] && for kv in $(echo "${rest#*+}" | tr '+' ' '); do extra="$extra --set $kv"; done
  r=/tmp/runs/$name
  if [ -f $r/recipe.yaml ]; then  # started before: resume (a finished run only completes its evaluation)
    args="$r --resume"; echo "$name: resuming $r"
  else
    args="$recipe --out $r --set data.files=$W --set stage1.steps=${S1:-300} --set stage2.steps=${S2:-300}
          --set stage1.warmup=30 --set stage2.warmup=30 --set checkpoint_every=100
          --set stage2.batch_size=4 --set stage2.grad_accum=4 $EVAL $extra"  # a run's own settings last: they win
  fi
  timeout -s TERM "${LIMIT:-540}" python -m attnedit convert $args --progress lines >> $r.log 2>&1 &
done
wait
files=()
for name in "${names[@]}"; do
  r=/tmp/runs/$name; echo "=== $name"; grep -v "^\s*$" $r.log | tail -n ${TAIL:-24}
  files+=($(cd /tmp/runs && ls -d $name.log $name/*.json $name/*.jsonl $name/report.md $name/recipe.yaml $name/model/config.json 2>/dev/null))
done
(cd /tmp/runs && tar -czf "$OUT/runs.tgz" "${files[@]}")  # one file: a GPU call brings back only a few
