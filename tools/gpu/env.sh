# Sourced by the GPU scripts (`source "$(dirname "$0")/env.sh"`): where ../shared/device/pack.sh unpacked the
# teacher and the data on the GPU machine, and the settings every run there shares.
export ATTNEDIT_SMOLLM2_GGUF=${ATTNEDIT_SMOLLM2_GGUF:-/tmp/attnedit-cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
W=${W:-/tmp/attnedit-cache/extra/wikipedia-en-2019-00000-of-00008.jsonl.xz}  # the training shard

dequantise_teacher() {  # once, before runs that would each do it
  python -c "from attnedit.teachers import local_path; local_path('smollm2-135m')"
}

shared_data() {  # the layout the eval reads (wikitext-2-raw/, and fewshot/ when it was packed) in $ATTNEDIT_SHARED_DATA
  export ATTNEDIT_SHARED_DATA=/tmp/shared-data
  mkdir -p $ATTNEDIT_SHARED_DATA/wikitext-2-raw
  cp -n /tmp/attnedit-cache/extra/wiki.test.raw $ATTNEDIT_SHARED_DATA/wikitext-2-raw/
  [ -d /tmp/attnedit-cache/extra/fewshot ] && ln -sfn /tmp/attnedit-cache/extra/fewshot $ATTNEDIT_SHARED_DATA/fewshot
  return 0
}
