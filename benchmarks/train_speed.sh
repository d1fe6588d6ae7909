#!/usr/bin/env bash
# Training throughput of the shipped SmolLM2 GPU recipes next to the teacher's plain forward, one run at a time.
# usage: bash benchmarks/train_speed.sh
# env: S1 / S2 stage steps (60 / 40), LIMIT seconds per run (none), EXTRA more --set flags
#      (e.g. EXTRA="--set stage1.compile=off --set stage2.compile=off" for the eager figures),
#      RECIPES (default "gateswa mla": recipes/smollm2-<name>.yaml; add swa-stock for the stock-servable variant,
#      mla-2k for the MLA recipe with stage 2 on 16 x 2048, attention only),
#      PROFILE optimizer steps profiled after each stage (3; 0 = none): profile-stage<N>.json in each run,
#      BEFORE a folder holding an older attnedit package (`git archive <commit> attnedit | tar -x -C DIR`): each
#      recipe (or each of BEFORE_RECIPES) is timed with it first, as run <recipe>-before, so a change's before/after
#      come from one machine,
#      TEACHER a teacher folder instead of smollm2-135m (speed does not depend on the weights: a randomly
#      initialised model of SmolLM2's config and tokenizer times the same, see random_teacher.py), DATA the
#      training text, RUNS and OUT (benchmarks/common.sh).
# The runs stay in $RUNS/speed/<recipe> (with held-out KL before/after in summary.json), so stock_swa.sh can export
# and evaluate them: STOCK_RUN=$RUNS/speed/swa-stock GATED=$RUNS/speed/gateswa bash benchmarks/stock_swa.sh export quality.
# Each run measures the teacher's forward at each stage's batch shape itself (attnedit convert does, at
# its start) and writes tok_s, teacher_fwd_tok_s, ratio and peak vs estimated memory into summary.json;
# this prints them as one table, next to the targets stage 1 >= 0.5x and stage 2 >= 0.25x the teacher's forward.
set -u
source "$(dirname "$0")/common.sh"
R=$(realpath -m "$RUNS/speed"); rm -rf "$R"; mkdir -p "$R"; REPO=$PWD
[ -n "${TEACHER:-}" ] && [ -e "$TEACHER" ] && TEACHER=$(realpath "$TEACHER")  # runs start in other folders
TEACHER_SET=""
if [ -n "${TEACHER:-}" ]; then TEACHER_SET="--set teacher=$TEACHER"; else dequantise_teacher; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
RECIPES=${RECIPES:-gateswa mla}; runs=""
for t in $RECIPES; do
  [ -n "${BEFORE:-}" ] && [[ " ${BEFORE_RECIPES:-$RECIPES} " == *" $t "* ]] && runs="$runs $t-before"
  runs="$runs $t"
done
for name in $runs; do  # one at a time: the GPU is timed
  t=${name%-before}; pkg=$REPO; [ "$name" != "$t" ] && pkg=$BEFORE
  start=$(date +%s)
  # run from the package's folder: `python -m` puts the working directory first on sys.path
  limit=""; [ -n "${LIMIT:-}" ] && limit="timeout -s TERM $LIMIT"
  (cd "$pkg" && $limit python -m attnedit convert "$REPO/recipes/smollm2-$t.yaml" --out $R/$name --progress lines $TEACHER_SET \
    $DATA_SET --set stage1.steps=${S1:-60} --set stage2.steps=${S2:-40} --set stage1.warmup=10 \
    --set stage2.warmup=10 --set checkpoint_every=1000 \
    $NO_EVAL --set profile_steps=${PROFILE:-3} ${EXTRA:-} > $R/$name.log 2>&1)
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
  grep -E "warning|Error|teacher plain forward" $R/$name.log | head -n 8
done
python - "$R" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
target = {1: 0.5, 2: 0.25}
gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
print(f"\n{'run':<12} {'stage':<6} {'tokens/step':>11} {'tok/s':>10} {'teacher fwd':>12} {'ratio':>6} {'target':>11} {'peak mem':>10} {'est.':>10} compiled")
for t in sorted(p.name for p in root.iterdir() if p.is_dir()):
    try:
        s = json.loads((root / t / "summary.json").read_text())
    except OSError:
        print(f"{t:<12} (no summary.json: see {t}.log)")
        continue
    for n in (1, 2):
        i = s.get(f"stage{n}", {})
        ratio = i.get("ratio") or 0
        verdict = f">={target[n]} " + ("ok" if ratio >= target[n] else "MISS")
        print(f"{t:<12} {n:<6} {i.get('tokens', 0) // max(1, i.get('steps', 1)):>11,} {i.get('tok_s', 0):>10,.0f} "
              f"{i.get('teacher_fwd_tok_s') or 0:>12,.0f} {ratio:>6.3f} {verdict:>11} {gib(i.get('peak_memory_bytes')):>10} "
              f"{gib(i.get('est_memory_bytes')):>10} {i.get('compiled')}")
print("\ndevice time per step by kernel family (ms): student step | the teacher's plain forward over the same tokens")
for t in sorted(p.name for p in root.iterdir() if p.is_dir()):
    try:
        s = json.loads((root / t / "summary.json").read_text())
    except OSError:
        continue
    for n in (1, 2):
        p = s.get(f"stage{n}", {}).get("profile")
        if not p:
            continue
        kinds = sorted(set(p["student_by_kind_ms"]) | set(p.get("teacher_by_kind_ms", {})))
        fam = "  ".join(f"{k} {p['student_by_kind_ms'].get(k, 0):.1f}|{p.get('teacher_by_kind_ms', {}).get(k, 0):.1f}" for k in kinds)
        print(f"{t:<12} {n}  step {p['student_step_device_ms']:.1f} | teacher {p.get('teacher_forward_ms_same_tokens', 0):.1f}"
              f"  (device ratio {p.get('device_ratio', 0):.3f})  {fam}")
PY
