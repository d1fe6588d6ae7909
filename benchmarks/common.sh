# Sourced by the benchmark scripts (`source "$(dirname "$0")/common.sh"`): the settings every run shares,
# each an environment variable with a default, so a script runs on any CUDA machine.
#   DATA  the training text for conversions (default: the recipes' own data.files)
#   RUNS  where run folders go (default: runs/bench)
#   OUT   where result files go (default: $RUNS/results)
# The eval's data (WikiText-2, few-shot tasks) is read from $ATTNEDIT_SHARED_DATA, as by attnedit itself.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} PYTHONUNBUFFERED=1
RUNS=${RUNS:-runs/bench}; OUT=${OUT:-$RUNS/results}
mkdir -p "$RUNS" "$OUT"
DATA_SET=""; [ -n "${DATA:-}" ] && DATA_SET="--set data.files=$(realpath "$DATA")"
NO_EVAL="--set eval.tasks= --set eval.passkey.contexts= --set eval.bench.contexts="  # convert evaluates nothing after saving

dequantise_teacher() {  # a GGUF teacher is dequantised once, before runs that would each do it (one line if it cannot be)
  python - "${1:-smollm2-135m}" <<'PY'
import sys
from attnedit.errors import AttnEditError
from attnedit.teachers import local_path
try:
    local_path(sys.argv[1])
except AttnEditError as e:
    sys.exit(f"attnedit: {e}")
PY
}

dequantise_teachers() {  # the teachers of ablation.sh's NAME=RECIPE[+KEY=VALUE...] specs, each distinct one once
  for t in $(python - "$@" <<'PY'
import sys
from attnedit.recipe import load_recipe
seen = []
for spec in sys.argv[1:]:
    recipe, *sets = spec.split("=", 1)[1].split("+")
    over = dict(kv.split("=", 1) for kv in sets if kv.startswith("teacher="))
    try:
        teacher = over.get("teacher") or load_recipe(recipe).teacher
    except Exception:  # a bad recipe fails in its own run, with its own one-line error
        continue
    if teacher not in seen:
        seen.append(teacher)
print("\n".join(seen))
PY
  ); do dequantise_teacher "$t"; done
}
