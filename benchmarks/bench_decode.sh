#!/usr/bin/env bash
# Decode/prefill speed on a GPU:  bash benchmarks/bench_decode.sh [PHASE ...]   PHASE: kernels grid stock (default: grid stock)
# kernels: Triton decode and FlexAttention sliding prefill vs PyTorch references, timings vs HBM bound.
# grid:    the teacher edited to GateSWA (the shipped GPU recipe's settings) and MLA (its ranks), teacher-initialised
#          (decode speed does not depend on the trained values); one `attnedit bench` run times both students
#          and the teacher on the same engine over CTX x BATCH (no stock path: it compiles per shape).
# stock:   one bench run at STOCK_CTX x STOCK_BATCH with the stock transformers teacher (static cache +
#          compile) next to both students and the same-engine teacher, with --profile (kernels per step).
# env: TEACHER (smollm2-135m), CTX, BATCH, STOCK_CTX, STOCK_BATCH, REPEATS, LIMIT (seconds per bench run, none
#      by default), TAG (suffix of the stock run's files), PREFILL=1 (bench --compile-prefill), FUSE=1 (bench
#      --fuse-projections), RUNS (the edited models), OUT (the JSON, tables and logs); see benchmarks/common.sh.
# The whole grid with all three engines: STOCK_CTX=2048 then 8192, STOCK_BATCH=1,16,64, TAG=-2k / -8k.
set -uo pipefail
source "$(dirname "$0")/common.sh"
TEACHER=${TEACHER:-smollm2-135m}
timed() { if [ -n "${LIMIT:-}" ]; then timeout -s INT "$LIMIT" "$@"; else "$@"; fi; }
PHASES=" ${*:-grid stock} "
has() { [[ "$PHASES" == *" $1 "* ]]; }
has kernels && python benchmarks/check_kernels.py 2>&1 | tee "$OUT/kernels.log"
# the GPU recipes' target settings, read from the recipes themselves
edit() {  # $1 recipe, $2 folder
  [ -d "$2" ] && return
  sets=$(python - "$1" "$TEACHER" <<'PY'
import sys, yaml
from attnedit.teachers import load_config
r = yaml.safe_load(open(sys.argv[1]))
args = dict(r.get("target_args", {}))
if str(args.get("full_layers", "")).startswith("auto:"):  # measured by convert on data; decode speed depends on how
    k = int(args["full_layers"].split(":")[1])            # many layers are full, not which: K evenly spaced ones
    n = load_config(sys.argv[2]).num_hidden_layers
    args["full_layers"] = ",".join(str(round((i + 1) * n / k) - 1) for i in range(k))
print(" ".join(f"--set {k}={v}" for k, v in args.items()), f"--target {r['target']}")
PY
)
  python -m attnedit edit "$TEACHER" $sets --set init=teacher --out "$2" > "$2.log" 2>&1 || { echo "edit $1 failed:"; tail -n 3 "$2.log"; }
}
edit recipes/smollm2-gateswa.yaml "$RUNS/gs"
edit recipes/smollm2-mla.yaml "$RUNS/mla"
if has grid; then
  timed python -m attnedit bench "$RUNS/gs" "$RUNS/mla" --teacher "$TEACHER" --contexts "${CTX:-2048,8192}" \
    --batches "${BATCH:-1,16,64}" --decode-tokens 32 --repeats "${REPEATS:-2}" --no-stock --save "$OUT/bench-grid.json" \
    2> "$OUT/bench-grid.log" | tee "$OUT/bench-grid.txt"
  tail -n 4 "$OUT/bench-grid.log"
fi
if has stock; then
  timed python -m attnedit bench "$RUNS/gs" "$RUNS/mla" --teacher "$TEACHER" --contexts "${STOCK_CTX:-8192}" \
    --batches "${STOCK_BATCH:-1,64}" --decode-tokens 32 --repeats "${REPEATS:-2}" --profile $([ "${PREFILL:-0}" = 1 ] && echo --compile-prefill) $([ "${FUSE:-0}" = 1 ] && echo --fuse-projections) \
    --save "$OUT/bench-stock${TAG:-}.json" \
    2> "$OUT/bench-stock${TAG:-}.log" | tee "$OUT/bench-stock${TAG:-}.txt"
  tail -n 4 "$OUT/bench-stock${TAG:-}.log"
fi
