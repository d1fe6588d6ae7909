#!/usr/bin/env bash
# The stock-servable GateSWA variant (gate: none, sink: 0) on a GPU: convert, export + parity check,
# quality next to the gated GateSWA at equal tokens, and stock compiled decode next to the stock teacher.
#
# usage: [S1=300 S2=300] [CONVERT_GATED=1] [GATED=$RUNS/gateswa] [STOCK_RUN=$RUNS/swa-stock] bash benchmarks/stock_swa.sh [PHASE ...]
#   PHASE: convert export quality decode (default: all four, in that order)
#   S1/S2 and the batch overrides are ablation.sh's (14.7 M tokens at 300 + 300 steps), so the variant is
#   compared at equal tokens with a gated run made by ablation.sh or by CONVERT_GATED=1 (which converts
#   recipes/smollm2-gateswa.yaml alongside, with the same settings, if $GATED/model is missing). Quality
#   includes the gated model when $GATED/model exists. Phases run separately too, e.g. `convert` first and
#   `export quality decode` later. RUNS, OUT, DATA: see benchmarks/common.sh; the WikiText-2 file is read from
#   $ATTNEDIT_SHARED_DATA/wikitext-2-raw, as by attnedit eval.
set -u
source "$(dirname "$0")/common.sh"
PHASES=" ${*:-convert export quality decode} "
R=${STOCK_RUN:-$RUNS/swa-stock}
G=${GATED:-$RUNS/gateswa}
T="--teacher smollm2-135m"
has() { [[ "$PHASES" == *" $1 "* ]]; }
dequantise_teacher

if has convert; then
  convert() {  # $1 recipe, $2 run folder
    if [ -d "$2/checkpoints" ] && [ ! -f "$2/summary.json" ]; then args="$2 --resume"
    else args="$1 --out $2 $DATA_SET --set stage1.steps=${S1:-300} --set stage2.steps=${S2:-300}
               --set stage1.warmup=30 --set stage2.warmup=30 --set checkpoint_every=100
               --set stage2.batch_size=4 --set stage2.grad_accum=4
               --set eval.tasks= --set eval.passkey.contexts= --set eval.bench.contexts="; fi  # measured below
    python -m attnedit convert $args --progress lines > "$2.log" 2>&1
  }
  convert recipes/smollm2-swa-stock.yaml $R &
  if [ "${CONVERT_GATED:-0}" = 1 ] && [ ! -d "$G/model" ]; then convert recipes/smollm2-gateswa.yaml "$G" & fi
  wait
  for r in $R $G; do [ -f "$r.log" ] && { echo "=== $r"; grep -v "^\s*$" "$r.log" | tail -n 6; cp "$r.log" "$OUT/"; }; done
fi

if has export; then
  python -m attnedit export $R/model --format stock --out $R/export --overwrite --check-context 1024 --json \
    > $R.export.json 2> $R.export.log || { echo "=== export FAILED"; tail -n 3 $R.export.log; }
  cp $R.export.json $R.export.log "$OUT/"
  grep -q '"ok"' $R.export.json && python - "$R.export.json" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
r = json.loads(t[t.index("{"):])
print(f"=== export: {r['stock_class']} (trust_remote_code=False): max |logit diff| {r['max_abs_logit_diff']:.2e}, "
      f"greedy {r['new_tokens']} tokens {'identical' if r['greedy_match'] else 'DIFFERENT'}, cache after "
      f"{r['cache_tokens']} tokens {r['stock_bytes']:,} B = designed {r['designed_bytes']:,} B "
      f"({100 * r['stock_bytes'] / r['teacher_bytes']:.1f}% of the teacher's): {'PASS' if r['ok'] else 'FAIL'}")
EOF
fi

if has quality; then
  for r in $R $G; do  # concurrent: nothing here is timed
    [ -d "$r/model" ] || continue
    (python -m attnedit eval $r/model $T --tasks wikitext2 --ppl-context 2048 --ppl-stride 1024 --save $r/ppl2k.json
     python -m attnedit eval $r/model $T --tasks wikitext2 --ppl-context 8192 --ppl-stride 4096 --save $r/ppl8k.json
     python -m attnedit passkey $r/model $T --contexts 2048,8192 --save $r/passkey.json
    ) > $r.quality.log 2>&1 &
  done
  wait
  for r in $R $G; do [ -f $r.quality.log ] && cp $r.quality.log "$OUT/"; done
  python - $R $G <<'EOF'
import json, os, sys
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
rows, teacher = [], {}
for name, run in zip(("stock (gate none, sink 0)", "gated GateSWA"), sys.argv[1:]):
    if not os.path.isdir(os.path.join(run, "model")):
        continue
    s = load(os.path.join(run, "summary.json")) or {}
    kl = (s.get("heldout_after") or {}).get("kl")
    row = [name, f"{kl:.4f}" if kl is not None else "-"]
    for ctx in ("2k", "8k"):
        e = load(os.path.join(run, f"ppl{ctx}.json"))
        w = (e or {}).get("tasks", {}).get("wikitext2", {})
        row.append(f"{w['student']['ppl']:.2f}" if w else "-")
        if w and w.get("teacher"):
            teacher[ctx] = w["teacher"]["ppl"]
    p = load(os.path.join(run, "passkey.json")) or {}
    for i, _ in enumerate(p.get("contexts", [])):
        grid = p.get("student")
        row.append(f"{sum(grid[i]) / len(grid[i]):.2f}" if grid else "-")
    rows.append(row)
    if p.get("teacher"):
        teacher["passkey"] = [sum(g) / len(g) for g in p["teacher"]]
if teacher:
    rows.append(["teacher", "0", f"{teacher.get('2k', float('nan')):.2f}", f"{teacher.get('8k', float('nan')):.2f}",
                 *[f"{a:.2f}" for a in teacher.get("passkey", [])]])
print("=== quality at equal tokens (held-out KL from each run's summary.json; WikiText-2 ppl; passkey accuracy)")
print(f"{'model':<28}{'KL':>8}{'ppl 2k':>9}{'ppl 8k':>9}{'pk 2k':>8}{'pk 8k':>8}")
for r in rows:
    print(f"{r[0]:<28}" + "".join(f"{v:>{w}}" for v, w in zip(r[1:], (8, 9, 9, 8, 8))))
EOF
fi

if has decode; then
  python benchmarks/stock_decode.py teacher=smollm2-135m swa-stock=$R/export --contexts ${DECODE_CTX:-2048,8192} --batches ${DECODE_BATCH:-1,64} \
    --new 64 --save "$OUT/stock_decode.json" > $R.decode.log 2>&1
  cp $R.decode.log "$OUT/"
  echo "=== stock compiled decode"; tail -n 7 $R.decode.log
fi
