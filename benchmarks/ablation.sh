#!/usr/bin/env bash
# Conversions at equal (reduced) tokens side by side on one GPU, each evaluated next to the teacher by
# convert's own eval step: WikiText-2 perplexity at 2k and 8k, passkey at 2k/4k/8k x 5 depths (no zero-shot
# tasks and no bench: the runs share the GPU, and decode speed does not depend on the weights).
# usage: [S1=300] [S2=300] [LIMIT=seconds] [FULL=1] bash benchmarks/ablation.sh NAME=RECIPE[+KEY=VALUE...] ...
# FULL=1 runs each recipe as written instead, at its own budget with its own evaluation (zero-shot tasks too), the
# bench left out: the full-budget rows, e.g. both shipped MLA recipes at once (QWEN: the GGUF that
# benchmarks/qwen2.5_coder_teacher.sh assembles):
#   FULL=1 bash benchmarks/ablation.sh "q-mla=recipes/qwen2.5-0.5b-mla.yaml+teacher=$QWEN" s-mla=recipes/smollm2-mla.yaml
#   settings are separated by '+' (a value may hold commas: eval.ppl_context=2048,8192); e.g. the full-layer
#   choice of docs/results.md:
#   bash benchmarks/ablation.sh gateswa-every=recipes/smollm2-gateswa.yaml+target_args.full_layers=every:6 \
#        gateswa-auto=recipes/smollm2-gateswa.yaml+target_args.full_layers=auto:5
# Each run goes to $RUNS/NAME (log: $RUNS/NAME.log); running the same command again resumes the runs a time
# limit (LIMIT) or a signal stopped. `attnedit report $RUNS/A $RUNS/B ... --out F.md` compares them.
# Many runs at once share the host's cores: each gets a few threads for its compiles and CPU work.
set -u
source "$(dirname "$0")/common.sh"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ $# -ge 1 ] || { echo "usage: bash benchmarks/ablation.sh NAME=RECIPE[+KEY=VALUE...] ..." >&2; exit 2; }
EVAL="--set eval.tasks=wikitext2 --set eval.ppl_context=2048,8192 --set eval.passkey.contexts=2048,4096,8192 --set eval.bench.contexts="
dequantise_teachers "$@"
names=()
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}; recipe=${rest%%+*}; names+=("$name")
  extra=""; [ "$rest" != "$recipe" ] && for kv in $(echo "${rest#*+}" | tr '+' ' '); do extra="$extra --set $kv"; done
  r=$RUNS/$name
  if [ -f "$r/recipe.yaml" ]; then  # started before: resume (a finished run only completes its evaluation)
    args="$r --resume"; echo "$name: resuming $r"
  elif [ -n "${FULL:-}" ]; then  # the recipe's own steps and evaluation
    args="$recipe --out $r $DATA_SET --set eval.bench.contexts= $extra"
  else
    args="$recipe --out $r $DATA_SET --set stage1.steps=${S1:-300} --set stage2.steps=${S2:-300}
          --set stage1.warmup=30 --set stage2.warmup=30 --set checkpoint_every=100
          --set stage2.batch_size=4 --set stage2.grad_accum=4 $EVAL $extra"  # a run's own settings last: they win
  fi
  if [ -n "${LIMIT:-}" ]; then
    timeout -s TERM "$LIMIT" python -m attnedit convert $args --progress lines >> "$r.log" 2>&1 &
  else
    python -m attnedit convert $args --progress lines >> "$r.log" 2>&1 &
  fi
done
wait
for name in "${names[@]}"; do
  echo "=== $name"; grep -v "^\s*$" "$RUNS/$name.log" | tail -n "${TAIL:-24}"
done
