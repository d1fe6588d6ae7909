"""Decode speed, time to first token and serving capacity at a real model's shapes, with random weights (speed and
memory do not depend on the weights): the teacher built from a config on the GPU, its students edited in memory
with each recipe's target settings, all timed in one run by ``attnedit bench``'s functions.

    python benchmarks/serving_at_scale.py tests/assets/qwen3-8b recipes/qwen3-8b-gateswa.yaml recipes/qwen3-8b-mla.yaml \\
        --contexts 8192,32768 --batches 1 --capacity --out OUT_DIR
    python benchmarks/serving_at_scale.py tests/assets/qwen2.5-coder-0.5b \\
        recipes/qwen2.5-0.5b-mla.yaml+target_args.rank_allocation=uniform \\
        recipes/qwen2.5-0.5b-gateswa.yaml+target_args.full_heads=3.0,7.1,11.0,15.1 --contexts 8192 --batches 1,64 --out OUT_DIR

An ``auto`` choice that ``convert`` measures on the run's data (MLA's ``rank_allocation``, GateSWA's ``full_heads``)
is pinned by ``+KEY=VALUE``: the same cache bytes and layer shapes up to how ranks or full heads are spread.

Writes ``OUT_DIR/bench-<target>.json`` (the bench.json layout, with ``capacity``) and prints each table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from attnedit import AttnEditError
from attnedit.cli.common import parse_sets
from attnedit.eval.bench import BenchSettings, format_bench, run_bench_many
from attnedit.recipe import load_recipe
from attnedit.surgery import edit_model


def read_recipes(parser: argparse.ArgumentParser, specs: list[str]) -> list:
    """Each ``RECIPE[+KEY=VALUE...]`` read, before anything is built: a bad one is the parser's one-line error."""
    try:
        return [load_recipe(path, parse_sets(sets)) for path, *sets in (spec.split("+") for spec in specs)]
    except AttnEditError as e:
        parser.error(str(e))


def random_students(teacher, recipes: list) -> dict:
    """{target: the teacher edited in memory with each recipe's target settings}, new attention randomly
    initialised (the weights do not change speed or memory)."""
    return {r.target: edit_model(teacher, r.target, {**r.target_args, "init": "random"}) for r in recipes}


def random_teacher(config_dir: str, dtype=torch.bfloat16, device: str = "cuda"):
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="folder with the teacher's config.json")
    p.add_argument(
        "recipes",
        nargs="+",
        help="recipes whose target and target_args make the students; RECIPE+KEY=VALUE[+...] changes settings, e.g. "
        "an 'auto' choice that convert measures on data, pinned for speed: "
        "recipes/qwen2.5-0.5b-gateswa.yaml+target_args.full_heads=3.0,7.1,11.0,15.1",
    )
    p.add_argument("--contexts", default="8192,32768")
    p.add_argument("--batches", default="1")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--capacity", action="store_true", help="also the largest batch each serves, and its throughput")
    p.add_argument("--prefill-chunk", type=int, default=None, help="model.prefill_chunk of every model (default: the models' own)")
    p.add_argument(
        "--fuse-projections",
        action="store_true",
        help="model.fuse_projections() on every student and the same-engine teacher (bench --fuse-projections)",
    )
    p.add_argument(
        "--fold-absorbed",
        action="store_true",
        help="model.fold_absorbed() on every student (bench --fold-absorbed): MLA's absorbed decode with W_uk and W_uv "
        "folded into the query's and the output's projections where that reads at most 4 MiB more a layer",
    )
    p.add_argument(
        "--compile-prefill",
        action="store_true",
        help="model.compile_prefill() on every student and the same-engine teacher (bench --compile-prefill)",
    )
    p.add_argument("--stock-cells", default=None, help="time the stock transformers path at these BxC cells too")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="cap this process's GPU memory at this many GiB "
        "(torch.cuda.set_per_process_memory_fraction), e.g. 79.6 for an 80 GB H100's usable memory on a larger card",
    )
    p.add_argument("--out", required=True, help="folder for the JSON files")
    args = p.parse_args()
    recipes = read_recipes(p, args.recipes)
    if not torch.cuda.is_available():
        p.error("it measures on a CUDA GPU, and torch sees none here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.memory_gb:
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 2**30 / total))
    teacher = random_teacher(args.config)
    students = random_students(teacher, recipes)
    if args.prefill_chunk:
        from attnedit.targets import AttnEditForCausalLM

        AttnEditForCausalLM.prefill_chunk = args.prefill_chunk  # the teacher's engine is built by the bench itself
    print(f"built teacher and {len(students)} students in {time.time() - t0:.0f} s", flush=True)
    stock_cells = [tuple(int(x) for x in c.split("x")) for c in args.stock_cells.split(",")] if args.stock_cells else None
    settings = BenchSettings(
        contexts=[int(c) for c in args.contexts.split(",")],
        batches=[int(b) for b in args.batches.split(",")],
        decode_tokens=args.decode_tokens,
        repeats=3,
        warmup=1,
        stock=stock_cells is not None,
        stock_cells=stock_cells,
        capacity=args.capacity,
        memory_gb=args.memory_gb,
        fuse_projections=args.fuse_projections,
        fold_absorbed=args.fold_absorbed,
        compile_prefill=args.compile_prefill,
    )

    def save(results: dict) -> None:
        for name, result in results.items():
            (out / f"bench-{name}.json").write_text(json.dumps({"config": args.config, **result}, indent=1))

    results = run_bench_many(students, teacher, settings, "bfloat16", log=lambda m: print(m, flush=True), partial=save)
    save(results)
    for name, result in results.items():
        print(f"== {name}\n{format_bench(result)}\n", flush=True)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
