#!/usr/bin/env bash
# The real-shape measurements in one go, each on random weights built from the real configs in tests/assets (speed
# and memory do not depend on the weights), each step logged to $OUT/<step>.log and skipped when its result exists:
#   memory   the Qwen3-8B recipes' stages at their real shapes (scale_memory.sh): measured peak next to the plan,
#            tokens/s against the teacher's forward, the time the recipe as written would take  -> docs/scaling.md
#   serve8k  Qwen3-8B at 8k: batch 1 and the largest batch each model serves (serving_at_scale.py --capacity)
#   q25      Qwen2.5-Coder-0.5B's shape at 1 x 8k and 64 x 8k, its recipes' `auto` choices pinned      -> docs/performance.md
#   fast32k  Qwen3-8B at 1 x 32k with fused projections and the compiled prefill (bench's --fuse-projections,
#            --compile-prefill) on every model: batch-1 decode and TTFT next to the teacher on the same path
#   q25fast  q25 with fused projections and the compiled prefill on every model (fewer kernels a step: what a small
#            model's step is made of)
#   q25fold  q25 with MLA's absorbed decode folded into its projections (bench's --fold-absorbed), the plain engine
#            otherwise: two fewer kernels a layer per decode step where the latent is small
#   prefill32k  Qwen3-8B's TTFT and prefill peak at 1 x 32k against model.prefill_chunk (8k, 16k, one piece)
#   prefill32kprof  the same with 8k chunks and one piece, each prefill profiled (prefill_chunk.py --profile): where a
#            chunked prefill's time goes over one piece's, kernel family by family  -> $OUT/prefill-32k-profile.json
#   a3b      Qwen3-30B-A3B at 8k and 32k, batch 1 and the largest batch (61 GB of weights: an H200's step)
# usage: [STEPS="memory serve8k q25 q25fast fast32k"] [MEMORY_GB=79.6] [GPU_MEMORY=79.2] [S1=20] [S2=12] [MEMORY_RECIPES="..."] \
#          bash benchmarks/at_scale.sh TOKENIZER_DIR DATA
#   TOKENIZER_DIR  a tokenizer that fits Qwen3's vocabulary (Qwen2.5's: the folder attnedit dequantises the
#                  Qwen2.5-Coder GGUF into, ~/.cache/attnedit/gguf/qwen2.5-coder-0.5b-instruct-*/)
#   DATA           the training text for the memory step (one Wikipedia shard is plenty)
# MEMORY_RECIPES: the memory step's recipes (default: both Qwen3-8B ones). MEMORY_GB caps the serving steps' memory
# and GPU_MEMORY the memory step's plan and run (both GiB: on an H200, run as on an 80 GB H100); the a3b step always
# uses the whole card.
# Disk: the 16 GB random Qwen3-8B teacher plus one run at a time (scale_memory.sh says how much); the teacher is
# removed after the memory step. On a 64 GB disk: TEACHER_DIR=/dev/shm/random-qwen3-8b (the teacher in host memory).
set -u
source "$(dirname "$0")/common.sh"
TOKENIZER=${1:?a tokenizer folder that fits the Qwen3 vocabulary}; TEXT=${2:?the training text for the memory step}
HERE=$(dirname "$0")
step() {  # name, then the command; skipped when $OUT/<name>.done exists (a finished step of an earlier call)
  local name=$1; shift
  [ -e "$OUT/$name.done" ] && { echo "== $name: done before ($OUT/$name.log)"; return; }
  echo "== $name $(date -u +%T)"
  if "$@" > "$OUT/$name.log" 2>&1; then touch "$OUT/$name.done"; echo "== $name finished $(date -u +%T)"; else echo "== $name failed: $OUT/$name.log"; fi
}
# the serving runs: each model's shape and its students (Qwen2.5's measured `auto` choices pinned), and the options
SERVE=(python "$HERE/serving_at_scale.py")
QWEN3_8B=(tests/assets/qwen3-8b recipes/qwen3-8b-gateswa.yaml recipes/qwen3-8b-mla.yaml)
QWEN25=(tests/assets/qwen2.5-coder-0.5b recipes/qwen2.5-0.5b-mla.yaml+target_args.rank_allocation=uniform
        recipes/qwen2.5-0.5b-gateswa.yaml+target_args.full_heads=3.0,7.1,11.0,15.1)
CAP=(${MEMORY_GB:+--memory-gb $MEMORY_GB}); FAST=(--fuse-projections --compile-prefill)
for s in ${STEPS:-memory serve8k q25 q25fast fast32k}; do
  case $s in
    memory) step memory env DATA="$TEXT" S1="${S1:-20}" S2="${S2:-12}" OUT="$OUT/memory" bash "$HERE/scale_memory.sh" tests/assets/qwen3-8b "$TOKENIZER" \
              ${MEMORY_RECIPES:-recipes/qwen3-8b-mla.yaml recipes/qwen3-8b-gateswa.yaml}
            rm -rf "${TEACHER_DIR:-$RUNS/random-qwen3-8b}" ;;
    serve8k) step serve8k "${SERVE[@]}" "${QWEN3_8B[@]}" --contexts 8192 --batches 1 --capacity "${CAP[@]}" --out "$OUT/qwen3-8b-8k" ;;
    q25) step q25 "${SERVE[@]}" "${QWEN25[@]}" --contexts 8192 --batches 1,64 "${CAP[@]}" --out "$OUT/qwen2.5-8k" ;;
    q25fast) step q25fast "${SERVE[@]}" "${QWEN25[@]}" --contexts 8192 --batches 1,64 "${FAST[@]}" "${CAP[@]}" --out "$OUT/qwen2.5-8k-fast" ;;
    q25fold) step q25fold "${SERVE[@]}" "${QWEN25[@]}" --contexts 8192 --batches 1,64 --fold-absorbed "${CAP[@]}" --out "$OUT/qwen2.5-8k-fold" ;;
    prefill32k) step prefill32k python "$HERE/prefill_chunk.py" "${QWEN3_8B[@]}" --context 32768 --chunks 8192,16384,0 ;;
    prefill32kprof) step prefill32kprof python "$HERE/prefill_chunk.py" "${QWEN3_8B[@]}" --context 32768 --chunks 8192,0 --profile \
              --json "$OUT/prefill-32k-profile.json" ;;
    fast32k) step fast32k "${SERVE[@]}" "${QWEN3_8B[@]}" --contexts 32768 --batches 1 "${FAST[@]}" "${CAP[@]}" --out "$OUT/qwen3-8b-32k-fast" ;;
    a3b) step a3b "${SERVE[@]}" tests/assets/qwen3-30b-a3b recipes/qwen3-30b-a3b-gateswa.yaml recipes/qwen3-30b-a3b-mla.yaml \
              --contexts 8192,32768 --batches 1 --capacity --out "$OUT/qwen3-30b-a3b" ;;
    *) echo "unknown step $s (memory, serve8k, q25, q25fast, q25fold, prefill32k, prefill32kprof, fast32k, a3b)"; exit 2 ;;
  esac
done
