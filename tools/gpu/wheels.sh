#!/usr/bin/env bash
# The wheels the GPU machine lacks, downloaded into .whl/ for ../shared/device/pack.sh (CPython 3.12, x86_64).
#   bash tools/gpu/wheels.sh            attnedit's own pure-Python needs: gguf, pydantic (every GPU script)
#   HARNESS=1 bash tools/gpu/wheels.sh  + lm-evaluation-harness and what it needs there (headline.sh's zero-shot
#                                        tasks; about 13 MB; pack ../shared/data/fewshot too: three chunks)
# The machine has torch, transformers, numpy, pandas, pyarrow, huggingface_hub, tqdm; it has no internet.
# sqlitedict, rouge_score and word2number publish no wheels: `pip wheel --no-deps` builds them here.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
grep -qx '/.carry-\*/' .git/info/exclude 2>/dev/null || echo '/.carry-*/' >> .git/info/exclude
BASE="gguf==0.19.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection"
HARNESS_PKGS="lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill multiprocess xxhash pytablewriter DataProperty
  mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet nltk defusedxml more_itertools"
BUILT="sqlitedict rouge_score word2number"
pkgs=$BASE; [ "${HARNESS:-0}" = 1 ] && pkgs="$pkgs $HARNESS_PKGS"
for p in $pkgs; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$p"
done
if [ "${HARNESS:-0}" = 1 ]; then
  for p in $BUILT; do python3 -m pip wheel -q --no-deps -w .whl "$p"; done
fi
ls .whl | sed 's/^/  /'; du -sh .whl
