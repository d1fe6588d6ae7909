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

dequantise_teacher() {  # a GGUF teacher is dequantised once, before runs that would each do it
  python -c "from attnedit.teachers import local_path; local_path('${1:-smollm2-135m}')"
}
