"""Time to first token and prefill peak memory against ``model.prefill_chunk``, for a teacher built from a config
with random weights and its students edited in memory from recipes (as benchmarks/serving_at_scale.py).

    python benchmarks/prefill_chunk.py tests/assets/qwen3-8b recipes/qwen3-8b-gateswa.yaml recipes/qwen3-8b-mla.yaml \\
        --context 32768 --chunks 8192,16384,0
"""

from __future__ import annotations

import argparse

import torch
from serving_at_scale import random_teacher

from attnedit.eval.bench import Clock
from attnedit.eval.generation import next_token
from attnedit.recipe import load_recipe
from attnedit.surgery import edit_model, teacher_on_attnedit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--chunks", default="8192,16384,0", help="prefill_chunk values; 0 = the whole prompt at once")
    args = p.parse_args()
    teacher = random_teacher(args.config)
    models = {"teacher": teacher_on_attnedit(teacher)}
    for path in args.recipes:
        r = load_recipe(path)
        models[r.target] = edit_model(teacher, r.target, {**r.target_args, "init": "random"})
    ids = torch.randint(3, teacher.config.vocab_size, (1, args.context), device="cuda")
    print(f"{'model':>8} {'chunk':>6} {'TTFT ms':>9} {'peak GiB over weights':>22}")
    for name, model in models.items():
        for chunk in [int(c) for c in args.chunks.split(",")]:
            model.prefill_chunk = chunk or None
            times = []
            for _ in range(3):
                cache = model.new_cache(static=True, batch_size=1, max_length=args.context + 8)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                clock = Clock(torch.device("cuda"))
                clock.mark()
                with torch.no_grad():
                    next_token(model, ids, cache)
                clock.mark()
                times.append(clock.intervals_ms()[0])
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                del cache
            print(f"{name:>8} {chunk:>6} {sorted(times)[1]:>9.1f} {peak:>22.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
