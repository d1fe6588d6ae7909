#!/usr/bin/env bash
# Issue 13's one-GPU check: the MLA recipe at reduced steps under torchrun (one process: FSDP2 units,
# DCP checkpoints, the distributed code path), its measured peak memory per stage (summary.json) next to
# the --dry-run plan for one GPU (attnedit convert --dry-run --world-size 1).
#   bash tools/gpu/dist_memory.sh          env: S1 / S2 (30 / 20), LIMIT (150 s)
set -u
source "$(dirname "$0")/env.sh"
R=/tmp/runs-dist; rm -rf $R
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SETS="--set data.files=$W --set stage1.steps=${S1:-30} --set stage2.steps=${S2:-20} --set stage1.warmup=5 --set stage2.warmup=5 --set checkpoint_every=15 --set heldout_eval=false
      --set eval.tasks= --set eval.passkey.contexts= --set eval.bench.contexts="  # no evaluation after training
python -m attnedit convert recipes/smollm2-mla-2k.yaml --out $R --dry-run --world-size 1 --gpu-memory 80 $SETS > "$OUT/dist-plan.txt" 2>&1
timeout -s TERM "${LIMIT:-150}" torchrun --standalone --nproc_per_node 1 -m attnedit convert recipes/smollm2-mla-2k.yaml --out $R \
  --progress lines $SETS > "$OUT/dist-run.log" 2>&1
echo "torchrun exit $?"; grep -iE "error|warning" "$OUT/dist-run.log" | head -n 5
cp $R/summary.json "$OUT/dist-summary.json" 2>/dev/null; ls $R/checkpoints 2>/dev/null | head
python - "$R/summary.json" "$OUT/dist-plan.txt" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no summary.json: see dist-run.log")
print("measured under torchrun (1 process):")
for n in (1, 2):
    i = s.get(f"stage{n}", {})
    p, e = i.get("peak_memory_bytes"), i.get("est_memory_bytes")
    print(f"  stage {n}: peak {p / 2**30 if p else float('nan'):.2f} GiB, single-process estimate {e / 2**30 if e else float('nan'):.2f} GiB, "
          f"{i.get('tok_s')} tok/s (ratio {i.get('ratio')}), compiled {i.get('compiled')}")
print("plan (--dry-run --world-size 1):")
print("".join(l for l in open(sys.argv[2]) if "GiB" in l or "stage" in l.lower()))
PY
