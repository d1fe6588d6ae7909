"""``attnedit convert``: run a recipe (edit -> stage 1 -> stage 2 -> saved model), or continue one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import AttnEditError
from .common import add_json, add_out, add_set, parse_sets

EPILOG = """\
examples:
  attnedit convert recipes/smollm2-mla-cpu.yaml                 # the 2-core CPU job (about 5 minutes)
  attnedit convert recipes/smollm2-mla.yaml --dry-run           # the plan: layers, params, tokens, memory, evaluation
  attnedit convert recipes/qwen3-8b-mla.yaml --dry-run --gpu-memory 80   # on an 80 GiB GPU: the micro-batches that fit
  attnedit convert recipes/qwen3-8b-mla.yaml --gpu-memory 79.2   # run as on an 80 GB card, even on a larger one
  attnedit convert recipes/smollm2-gateswa.yaml --set stage2.steps=2000 --set data.seq_len=2048
  attnedit convert recipes/smollm2-mla.yaml --set stage1.steps=0 --out runs/stage2-only
  attnedit convert recipes/smollm2-mla.yaml --set eval.tasks=wikitext2 --set eval.ppl_context=2048,8192
  attnedit convert runs/smollm2-mla --resume                    # continue an interrupted run (or its evaluation)

The run folder (default runs/<recipe name>) gets recipe.yaml, metrics.jsonl, checkpoints/,
summary.json and model/; then, as the recipe's eval: section asks, eval.json, passkey.json,
bench.json and report.md, and the student-vs-teacher tables are printed at the end.
`attnedit recipe --explain` lists every recipe field.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="run a recipe: edit -> stage 1 -> stage 2 -> saved model (resumable)",
        description="Convert a teacher's attention as a recipe says: edit the model, train the new attention "
        "layer by layer on the teacher's activations (stage 1), distil the whole model (stage 2), save it, "
        "then evaluate it next to the teacher and write the report (the recipe's eval: section).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="recipe YAML; or, with --resume, a run folder")
    add_set(p, "override a recipe field, e.g. stage1.lr=3e-4 or eval.tasks=wikitext2")
    add_out(p, "run folder (default: runs/<recipe name>; with a run folder as source: that folder)", required=False)
    p.add_argument("--dry-run", action="store_true", help="print the plan (layers, params, tokens, estimated memory, evaluation) and exit")
    add_json(p, "with --dry-run: print the plan as JSON")
    p.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: the plan on N GPUs under torchrun, the memory per GPU, and the fewest that fit")
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GiB",
        help="use at most this much of each GPU: a run fits its micro-batches to it and its allocator stops there (to share "
        "a card, or measure a smaller one on a larger; give it again with --resume, which fits anew); with --dry-run, plan for "
        "GPUs of this memory (default with --world-size: 80)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run folder from its last good checkpoint (a run whose model is saved: only its missing evaluation)"
    )
    p.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "lines", "none"],
        help="progress display (auto: a bar on a terminal, else one line per log step)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recipe import load_recipe
    from ..stages import convert, format_plan, format_summary, make_plan
    from ..stages.evaluate import format_evaluation

    src = Path(args.source)
    sets = parse_sets(args.set)
    if src.is_dir():
        if not (src / "recipe.yaml").is_file():
            raise AttnEditError(f"{src} is a folder without recipe.yaml; give a recipe YAML or a run folder")
        if not (args.resume or args.dry_run):
            raise AttnEditError(f"{src} is a run folder; add --resume to continue it (or give a recipe YAML to start a new run)")
        recipe, out = load_recipe(src / "recipe.yaml", sets), Path(args.out or src)
    else:
        recipe, out = load_recipe(src, sets), Path(args.out or Path("runs") / src.stem)
    if args.dry_run:
        plan = make_plan(recipe, args.gpu_memory, args.world_size)
        plan["run_dir"] = str(out)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan) + f"\nrun folder       {out}")
        if args.world_size:  # the per-GPU memory plan
            from ..distributed.memory import GiB
            from ..stages.format import format_memory_plan
            from ..stages.plan import DEFAULT_GPU_GIB, memory_plan, smallest_world
            from ..teachers import load_config

            config, gpu = load_config(recipe.teacher), (args.gpu_memory or DEFAULT_GPU_GIB) * GiB
            smallest, fitted = smallest_world(config, recipe, gpu), smallest_world(config, recipe, gpu, adapt=True)[0]
            print("\n" + format_memory_plan(memory_plan(config, recipe, args.world_size, gpu), smallest, fitted))
        return 0
    from .. import distributed  # under torchrun, one process of N

    parallel = distributed.from_env(recipe.device)
    if args.gpu_memory is not None:
        from ..distributed.memory import cap_gpu_memory

        cap_gpu_memory(args.gpu_memory)
    try:
        summary = convert(recipe, out, resume=args.resume, progress=args.progress, parallel=parallel)
    finally:
        parallel.shutdown()
    if parallel.main:
        print(format_summary(summary, out))
        tables = format_evaluation(recipe, out)
        if tables:
            print("\nstudent vs teacher\n\n" + tables)
    return 0
