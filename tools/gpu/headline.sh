#!/usr/bin/env bash
# Issue 11, the headline conversions: a shipped SmolLM2 GPU recipe at its full budget (33 M + 66 M tokens),
# alone on the GPU, then the recipe's own eval section next to the teacher (zero-shot tasks through
# lm-evaluation-harness on the full sets, WikiText-2 ppl at 2k and 8k, passkey at 2k/4k/8k, bench).
# One call runs at most 10 minutes: run the same command again (on the same warm machine) and it resumes
# the conversion, then the evaluation, where the last call stopped; it prints DONE when report.md exists.
#
# usage: [EXTRA="--set k=v ..."] bash tools/gpu/headline.sh gateswa|mla|mla-2k [LIMIT seconds, default 560]
#   EXTRA applies when the run starts (a resumed run keeps its recipe). Both targets side by side on one GPU:
#   EXTRA="--set eval.bench.contexts=" bash tools/gpu/headline.sh gateswa & EXTRA=... bash tools/gpu/headline.sh mla & wait
#   (no bench while the GPU is shared: its timings would be the two runs' together)
# needs: the pack with the harness's wheels in .whl/ (HARNESS=1 bash tools/gpu/wheels.sh) and ../shared/data/fewshot,
#        i.e. CHUNK=60000000 ../shared/device/pack.sh <wikipedia shard> <wiki.test.raw> ../shared/data/fewshot
#        (a call carries 64 MiB with the working tree: 64,000,000-byte chunks stopped fitting once the tree passed 3.1 MB)
set -u
t=${1:?gateswa, mla or mla-2k (recipes/smollm2-<t>.yaml)}; LIMIT=${2:-560}
source "$(dirname "$0")/env.sh"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
shared_data   # wikitext-2-raw/ and fewshot/ as the eval expects them
python -c "import lm_eval" 2>/dev/null || echo "warning: lm_eval does not import: the zero-shot tasks will fail (see docs/results.md)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/runs
r=/tmp/runs/headline-$t
dequantise_teacher
if [ -f $r/recipe.yaml ]; then args="$r --resume"; else args="recipes/smollm2-$t.yaml --out $r --set data.files=$W ${EXTRA:-}"; fi
start=$(date +%s)
timeout -s TERM "$LIMIT" python -m attnedit convert $args --progress lines >> $r.log 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"; grep -v "^\s*$" $r.log | tail -n 30
(cd /tmp/runs && tar -czf "$OUT/headline-$t.tgz" $(ls -d headline-$t.log headline-$t/*.json headline-$t/*.jsonl headline-$t/*.md headline-$t/*.png headline-$t/recipe.yaml headline-$t/model/config.json 2>/dev/null))
[ -f $r/report.md ] && echo DONE
