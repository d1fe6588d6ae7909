#!/usr/bin/env bash
# The ablation rows of docs/results.md, all at equal tokens (14.7 M each: stage 1 300 x 16 x 1024 + stage 2
# 300 x 16 x 2048, or the same tokens in one stage), every target, side by side on one GPU through ablation.sh;
# plus the runs that test what would close the headline's misses at the same budget (stage 2 at 8k, every
# weight training in stage 2, recall spans in stage 2's data).
# usage: bash benchmarks/ablation_rows.sh        (19 runs of 6-9 GiB each; run it again to resume)
#        ROWS="gs-base gs-recall" bash benchmarks/ablation_rows.sh   (a subset, by name)
#        ROWS="gsh-base gsh-layers" bash benchmarks/ablation_rows.sh; ROWS="q-base q-kl" bash ...
#        (the lower-budget GateSWA rows: by name only; q-* read the Qwen2.5 teacher from the recipe's GGUF path,
#        which benchmarks/qwen2.5_coder_teacher.sh fills, or from QWEN=<its folder or .gguf>)
# then: cd $RUNS && attnedit report gs-* --out gateswa.md && attnedit report mla-* --out mla.md && attnedit report gqa-base
# Each target's rows start from the settings its rows were first measured with, so that a later change of a
# shipped recipe does not move them (smollm2-mla.yaml now trains every weight in stage 2, on 8k sequences without
# feature matching; both shipped recipes measure passkey with 20 keys a cell, each with its own filler).
ROWS_PASSKEY="+eval.passkey.trials=5+eval.passkey.filler=same"
G="recipes/smollm2-gateswa.yaml$ROWS_PASSKEY"
V="+eval.passkey.trials=20+eval.passkey.filler=varied"   # the 20-key protocol, for rows that compare retrieval
M="recipes/smollm2-mla.yaml+stage2.seq_len=2048+stage2.feature_weight=0.1+stage2.trainable=attention$ROWS_PASSKEY"
H="recipes/smollm2-gateswa-heads.yaml+stage2.batch_size=1"
Q="recipes/qwen2.5-0.5b-gateswa.yaml+stage2.batch_size=1${QWEN:++teacher=$QWEN}"
declare -A SPEC=(
  [gs-base]="$G"                                                   # stage 1 + 2, teacher init, features 0.1
  [gs-s2only]="$G+stage1.steps=0+stage2.steps=450"                 # the same 14.7 M tokens, all in stage 2
  [gs-s1only]="$G+stage1.steps=900+stage2.steps=0"                 # ... all in stage 1
  [gs-random]="$G+target_args.init=random"
  [gs-nofeat]="$G+stage2.feature_weight=0"
  [gs-s2long]="$G+stage2.seq_len=8192+stage2.batch_size=1"         # 1 x 4 x 8192: the same tokens per step
  [gs-s2long-pinned]="$G+stage2.seq_len=8192+stage2.batch_size=1+target_args.full_layers=3,7,8,18,23"  # only the length differs from gs-base
  [gs-all]="$G+stage2.trainable=all"
  [gs-recall]="$G+stage2.recall_fraction=0.5"
  [gs-base-20]="$G$V"                                              # gs-base, passkey with 20 keys a cell
  [gs-full-5-7-8-18-23]="$G$V+target_args.full_layers=5,7,8,18,23"  # layer 5 (the retrieval probe's best) for 3 (its worst)
  [gs-full-3-5-7-8-18]="$G$V+target_args.full_layers=3,5,7,8,18"    # layer 5 for 23: what auto:5 picks on 8k blocks
  [mla-base]="$M"
  [mla-s2only]="$M+stage1.steps=0+stage2.steps=450"
  [mla-s1only]="$M+stage1.steps=900+stage2.steps=0"
  [mla-random]="$M+target_args.init=random"
  [mla-nofeat]="$M+stage2.feature_weight=0"
  [mla-s2long]="$M+stage2.seq_len=8192+stage2.batch_size=1"
  [mla-all]="$M+stage2.trainable=all"
  [gqa-base]="recipes/smollm2-gqa.yaml$ROWS_PASSKEY"                # GQA 3 -> 1 KV head: the recipe is at this budget
  # GateSWA at the lower budgets (smollm2-gateswa-heads.yaml, qwen2.5-0.5b-gateswa.yaml), one choice a row, stage 2
  # at 1 x 4 x 8192 (the same 14.7 M tokens)
  [gsh-base]="$H"                                                  # KV heads full under 22% at 8k, scored for recall
  [gsh-layers]="$H+target_args.full_layers=auto@0.22:8192+target_args.full_heads=none"   # whole layers, same budget
  [gsh-kl]="$H+target_args.auto_score=kl"                         # heads scored by the KL alone
  [gsh-sink4]="$H+target_args.sink=4"
  [gsh-sink128]="$H+target_args.sink=128"
  [gsh-w256]="$H+target_args.window=256+stage2.recall_min_distance=257"
  [gsh-w1024]="$H+target_args.window=1024+stage2.recall_min_distance=1025"
  [gsh-norecall]="$H+stage2.recall_fraction=0"                    # no recall spans in stage 2
  [gsh-near]="$H+stage2.recall_min_distance=0"                    # recall spans at any distance (the earlier form)
  [q-base]="$Q"                                                    # KV heads full under 12% at 8k, scored for recall
  [q-layers]="$Q+target_args.full_layers=auto@0.12:8192+target_args.full_heads=none"
  [q-kl]="$Q+target_args.auto_score=kl"
  [q-sink4]="$Q+target_args.sink=4"
  [q-w512]="$Q+target_args.window=512+stage2.recall_min_distance=513"
  [q-norecall]="$Q+stage2.recall_fraction=0"
)
ORDER="gs-base gs-s2only gs-s1only gs-random gs-nofeat gs-s2long gs-s2long-pinned gs-all gs-recall
       gs-base-20 gs-full-5-7-8-18-23 gs-full-3-5-7-8-18
       mla-base mla-s2only mla-s1only mla-random mla-nofeat mla-s2long mla-all
       gqa-base"
LOWER="gsh-base gsh-layers gsh-kl gsh-sink4 gsh-sink128 gsh-w256 gsh-w1024 gsh-norecall gsh-near
       q-base q-layers q-kl q-sink4 q-w512 q-norecall"   # by name only (ROWS=...): not part of the default set
args=()
for name in ${ROWS:-$ORDER}; do
  [ -n "${SPEC[$name]:-}" ] || { echo "ablation_rows.sh: no row named $name; choose from: $ORDER $LOWER" >&2; exit 2; }
  args+=("$name=${SPEC[$name]}")
done
TAIL=${TAIL:-8} exec bash "$(dirname "$0")/ablation.sh" "${args[@]}"
