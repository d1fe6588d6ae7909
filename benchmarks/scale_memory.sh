#!/usr/bin/env bash
# Recipes for a model too large to download, measured at its real shapes on one GPU: a random-weight teacher built
# from the model's config (speed and memory do not depend on the weights) with a stand-in tokenizer, then memory.sh
# on each recipe: each stage's measured peak next to the plan, tokens/s and the ratio to the teacher's forward at the
# same shapes, and the time the recipe as written would take at that speed.
#   bash benchmarks/scale_memory.sh CONFIG_DIR TOKENIZER_DIR RECIPE...
#   env: DATA (required: the training text; one Wikipedia shard is plenty), TEACHER_DIR (default
#        $RUNS/random-<config folder>, reused when it exists), ACCUM (default: one micro-batch a step in stage 1,
#        two in stage 2: a peak and tokens/s depend on the micro-batch, which convert fits to the GPU, not on how
#        many a step accumulates), and memory.sh's S1 / S2 / EXTRA / RUNS / OUT / GPU_MEMORY (GPU_MEMORY=79.2 on an
#        H200: fit and run as on an 80 GB H100)
# e.g. Qwen3-8B on one H100, with Qwen2.5's tokenizer (the same BPE and vocabulary size) from the folder attnedit
# dequantises the Qwen2.5-Coder GGUF into (benchmarks/qwen2.5_coder_teacher.sh); on one H100 the teacher takes 25 s
# to build and save, and each recipe a few minutes to load, edit, compile and run its steps (docs/scaling.md):
#   DATA=../shared/data/wikipedia-en-2019/wikipedia-en-2019-00000-of-00008.jsonl.xz bash benchmarks/scale_memory.sh \
#     tests/assets/qwen3-8b ~/.cache/attnedit/gguf/qwen2.5-coder-0.5b-instruct-*/ recipes/qwen3-8b-mla.yaml recipes/qwen3-8b-gateswa.yaml
# Disk: the teacher (16 GB for Qwen3-8B) plus one run at a time, removed after it: its model (16 GB) and up to two
# checkpoints while the second is written (the trained weights and AdamW's moments, 12 bytes a trained parameter:
# 17 GB each for Qwen3-8B MLA, 25 GB for GateSWA; the runs keep one). On a 64 GB disk that is too much beside the
# teacher: put the teacher in host memory, TEACHER_DIR=/dev/shm/random-qwen3-8b.
set -u
source "$(dirname "$0")/common.sh"
CONFIG=${1:?a folder with the model config.json}; TOKENIZER=${2:?a folder with a tokenizer that fits its vocabulary}
shift 2; [ $# -gt 0 ] || { echo "name at least one recipe"; exit 2; }
[ -n "${DATA:-}" ] || { echo "set DATA to the training text (a .jsonl/.jsonl.xz/.txt file or a glob)"; exit 2; }
TEACHER_DIR=${TEACHER_DIR:-$RUNS/random-$(basename "$CONFIG")}
if [ ! -e "$TEACHER_DIR/config.json" ]; then
  python "$(dirname "$0")/random_teacher.py" "$CONFIG" "$TEACHER_DIR" "$TOKENIZER" || exit 1
fi
df -h "$RUNS" | tail -n 1
ACCUM=${ACCUM:---set stage1.grad_accum=1 --set stage2.grad_accum=2}
for recipe in "$@"; do
  name=$(basename "$recipe" .yaml)
  echo "== $name"
  EXTRA="--set teacher=$(realpath "$TEACHER_DIR") $ACCUM --set checkpoint_every=1000000 --set keep_checkpoints=1 ${EXTRA:-}" \
    bash "$(dirname "$0")/memory.sh" "$recipe"
  rm -rf "$RUNS/$name-memory"
done
