"""Stock compiled decode speed: exported checkpoints (and the stock teacher) in plain transformers.

Each model loads with ``AutoModelForCausalLM`` (no remote code) in bf16 and generates with
``cache_implementation="static"``, which makes transformers compile the decode step itself
(``torch.compile``, mode reduce-overhead). A logits processor records a CUDA event after every
forward: prefill = start -> first event, decode = first -> last event over ``new - 1`` steps, so
decode tokens/s = batch * (new - 1) / decode time. Every cell runs twice; the first (compile, warm-up)
is discarded.

    python benchmarks/stock_decode.py teacher=smollm2-135m swa-stock=runs/bench/swa-stock/export \
        --contexts 2048,8192 --batches 1,64 [--new 64] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


class Marks(LogitsProcessor):
    def __init__(self):
        self.events = []

    def __call__(self, input_ids, scores):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)
        return scores


def load(path: str):
    if path == "smollm2-135m":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for attnedit
        from attnedit.teachers import local_path

        path = local_path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=False)
    return model.to("cuda").eval()


@torch.no_grad()
def cell(model, batch: int, context: int, new: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(100, model.config.vocab_size // 2), model.config.vocab_size, (batch, context), generator=g).cuda()
    kw = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=model.config.pad_token_id or 0,
    )
    out = {}
    for run in ("warm-up", "timed"):
        marks = Marks()
        start = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        seq = model.generate(ids, logits_processor=LogitsProcessorList([marks]), **kw)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        assert seq.shape[1] == context + new and len(marks.events) == new
        decode_ms = marks.events[0].elapsed_time(marks.events[-1])
        out = {
            "batch": batch,
            "context": context,
            "new": new,
            "prefill_ms": start.elapsed_time(marks.events[0]),
            "decode_ms_per_step": decode_ms / (new - 1),
            "decode_tok_s": batch * (new - 1) / (decode_ms / 1000),
            "wall_s": wall,
            "run": run,
        }
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="name=path (path: a stock checkpoint folder, or smollm2-135m)")
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--new", type=int, default=64, help="generated tokens per cell")
    p.add_argument("--save", default=None)
    args = p.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(contexts) * len(batches))
    results, models = {}, {}
    for spec in args.models:  # all loaded first, then each cell for every model in turn: a run cut short keeps pairs
        name, path = spec.split("=", 1)
        models[name] = load(path)
        results[name] = {"path": path, "class": type(models[name]).__name__, "cells": []}
    for b in batches:
        for c in contexts:
            for name, model in models.items():
                torch.cuda.reset_peak_memory_stats()
                try:
                    r = cell(model, b, c, args.new)
                except torch.cuda.OutOfMemoryError:
                    r = {"batch": b, "context": c, "error": "out of memory"}
                    torch.cuda.empty_cache()
                results[name]["cells"].append(r)
                print(
                    f"{name:<12} b={b:<3} ctx={c:<5} "
                    + (
                        f"decode {r['decode_tok_s']:9.0f} tok/s  {r['decode_ms_per_step']:6.2f} ms/step  "
                        f"prefill {r['prefill_ms']:8.1f} ms  peak {r['peak_gib']:5.1f} GiB"
                        if "error" not in r
                        else r["error"]
                    ),
                    flush=True,
                )
                if args.save:  # after every cell, so a run cut short keeps what it measured
                    Path(args.save).write_text(json.dumps(results, indent=2))
    names = list(results)
    print(f"\nstock compiled decode (transformers, static cache, bf16), tokens/s; x = vs {names[0]}")
    print(f"{'batch x ctx':<12}" + "".join(f"{n:>16}" for n in names))
    for i, r0 in enumerate(results[names[0]]["cells"]):
        row = f"{r0['batch']:>3} x {r0['context']:<6}"
        for n in names:
            r = results[n]["cells"][i]
            if "error" in r:
                row += f"{'OOM':>16}"
                continue
            x = r["decode_tok_s"] / r0["decode_tok_s"] if "error" not in r0 else float("nan")
            row += f"{r['decode_tok_s']:>9.0f} ({x:4.2f}x)"
        print(row)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
