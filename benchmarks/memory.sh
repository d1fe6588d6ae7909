#!/usr/bin/env bash
# Each stage's measured peak GPU memory next to the plan's (the one memory model, attnedit/distributed/memory.py):
# a recipe at reduced steps, on one process or N under torchrun, then summary.json's peak_memory_bytes
# (torch.cuda.max_memory_allocated) next to est_memory_bytes, and the --dry-run plan for the same GPUs.
#   bash benchmarks/memory.sh RECIPE [NPROC]     env: S1 / S2 (30 / 20), EXTRA (more --set flags), RUNS, OUT, DATA,
#   GPU_MEMORY (GiB: run and plan as on a card of that size, e.g. 79.2 for an 80 GB H100 on a larger GPU)
# e.g. bash benchmarks/memory.sh recipes/smollm2-mla-2k.yaml 1   (docs/scaling.md's check: torchrun, one process)
set -u
source "$(dirname "$0")/common.sh"
RECIPE=${1:?a recipe}; NPROC=${2:-}
name=$(basename "$RECIPE" .yaml)-memory${NPROC:+-$NPROC}
R=$RUNS/$name; rm -rf "$R"
SETS="$DATA_SET --set stage1.steps=${S1:-30} --set stage2.steps=${S2:-20} --set stage1.warmup=5 --set stage2.warmup=5
      --set checkpoint_every=15 --set heldout_eval=false $NO_EVAL ${EXTRA:-}"
gib=${GPU_MEMORY:-$(python -c "import torch; print(torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else '')")}  # none on a CPU
python -m attnedit convert "$RECIPE" --out "$R" --dry-run ${gib:+--gpu-memory $gib} ${NPROC:+--world-size $NPROC} $SETS > "$OUT/$name-plan.txt" 2>&1
if [ -n "$NPROC" ]; then
  torchrun --standalone --nproc_per_node "$NPROC" -m attnedit convert "$RECIPE" --out "$R" --progress lines $SETS ${GPU_MEMORY:+--gpu-memory $GPU_MEMORY} > "$OUT/$name.log" 2>&1
else
  python -m attnedit convert "$RECIPE" --out "$R" --progress lines $SETS ${GPU_MEMORY:+--gpu-memory $GPU_MEMORY} > "$OUT/$name.log" 2>&1
fi
echo "convert exit $?"; grep -iE "error|warning|fitted|micro-batch|stage [12] done" "$OUT/$name.log" | head -n 8
cp "$R/summary.json" "$OUT/$name-summary.json" 2>/dev/null
python - "$R/summary.json" "$OUT/$name-plan.txt" "$RECIPE" <<'PY'
import json, sys
from attnedit.recipe import load_recipe
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no summary.json: see the run's log")
shipped, total = load_recipe(sys.argv[3]), 0.0  # the recipe as written: its token budget at the measured speed
for n in (1, 2):
    i = s.get(f"stage{n}", {})
    p, e = i.get("peak_memory_bytes"), i.get("est_memory_bytes")
    if p and e:
        print(f"stage {n}: measured peak {p / 2**30:.2f} GiB, planned {e / 2**30:.2f} GiB ({100 * (e / p - 1):+.1f}%), "
              f"{i.get('tok_s')} tok/s (ratio to the teacher's forward {i.get('ratio')}), compiled {i.get('compiled')}"
              + (f", fitted to the GPU: {i['fitted_to_gpu']}" if i.get("fitted_to_gpu") else ""))
    tokens = shipped.stage_tokens(n)
    if tokens and i.get("tok_s") and i.get("steps", 0) <= shipped.log_every:  # its one log window has the compilation
        print(f"stage {n}: {i['steps']} steps are one log window, compilation included: too few to project its time")
        total = None
    elif tokens and i.get("tok_s"):
        total = total if total is None else total + tokens / i["tok_s"]
        print(f"stage {n} as the recipe is written: {tokens:,} tokens, {tokens / i['tok_s'] / 3600:.1f} h at the measured tok/s")
if total:
    print(f"the whole recipe on this GPU: about {total / 3600:.1f} h of training (evaluation not included)")
print("plan (--dry-run):")
print("".join(line for line in open(sys.argv[2]) if "GiB" in line or line.startswith("stage")))
PY
