"""What a GateSWA recipe's auto choice keeps full, measured on its data without training (docs/results.md).

Runs the measurement ``attnedit convert`` makes before it edits (``full_layers``/``full_heads: auto...``) on the
recipe's teacher and training text, once per ``--score`` (kl, recall), and prints each choice, where the scores
agree, the units' scores (nats per token) and the KV the choice keeps at the budget's context. ``--json`` writes
the records (as ``full_layers.json`` holds them).

usage: python benchmarks/choose_full.py RECIPE [--set KEY=VALUE ...] [--blocks 8] [--score kl --score recall]
                                        [--top 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attnedit.data import resolve_tokenizer
from attnedit.data.recall import long_range_blocks
from attnedit.eval.kv import kv_summary
from attnedit.recipe import load_recipe
from attnedit.stages.context import sensitivity_ids
from attnedit.surgery import edited_config
from attnedit.surgery.selection import resolve_auto
from attnedit.teachers import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides, as convert's --set")
    ap.add_argument("--blocks", type=int, default=8, help="calibration blocks (convert uses 8)")
    ap.add_argument("--score", action="append", choices=("kl", "recall"), help="default: both")
    ap.add_argument("--top", type=int, default=20, help="units listed by score")
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, dict(kv.split("=", 1) for kv in a.set))
    teacher, tok = load_model(recipe.teacher, device=recipe.device if recipe.device != "auto" else "cpu")
    teacher.requires_grad_(False)
    tokenizer = resolve_tokenizer(recipe.data, tok, teacher.config.vocab_size)
    ids = sensitivity_ids(recipe, tokenizer, recipe.target_args.get("auto_seq_len"), n=a.blocks)
    print(f"{recipe.teacher}: {ids.shape[0]} blocks of {ids.shape[1]} tokens; {recipe.target_args}")
    records = {}
    for score in a.score or ["kl", "recall"]:
        t0 = time.time()
        args, record = resolve_auto(teacher, {**recipe.target_args, "auto_score": score}, lambda: ids, long_range=long_range_blocks)
        if record is None:
            raise SystemExit("the recipe's full_layers/full_heads make no auto choice")
        records[score] = record
        config = edited_config(teacher.config, "gateswa", args)
        context = record.get("budget", {}).get("context", 8192)
        kv = kv_summary(config, context, "bfloat16")["kv_bytes_per_token"] / kv_summary(teacher.config, context, "bfloat16")["kv_bytes_per_token"]
        print(
            f"\n{score}: full_layers={args['full_layers']} full_heads={args['full_heads']} ({kv:.1%} of the teacher's KV at {context}; {time.time() - t0:.0f} s)"
        )
        if "scores_kl" in record:
            cost = record["scores_kl"] if score == "kl" else [x + y for x, y in zip(record["scores_kl"], record["scores_recall"])]
            order = sorted(range(len(cost)), key=lambda i: -cost[i])[: a.top]
            extra = lambda i: f"  recall {record['scores_recall'][i]:.4f}" if score == "recall" else ""  # noqa: E731
            for i in order:
                print(f"  {record['candidates'][i]}  kl {record['scores_kl'][i]:.5f}{extra(i)}")
    if len(records) == 2:
        both = [u for u in records["kl"]["chosen"] if u in records["recall"]["chosen"]]
        print(f"\nchosen by both: {len(both)} of {len(records['kl']['chosen'])}: {both}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    with torch.no_grad():
        main()
