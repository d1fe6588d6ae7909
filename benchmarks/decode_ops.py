"""What a compiled decode step is made of, on any machine (CPU included): the ATen operations of the step's graph as
``torch.compile`` traces it (before any backend fuses them), for the teacher and each student at a real model's
widths with a few layers, under each engine option. A step's fixed cost on a small model is its kernel count; this
shows where an option removes operations without a GPU (which operations become kernels is the backend's choice:
time them with ``attnedit bench``).

    python benchmarks/decode_ops.py tests/assets/qwen2.5-coder-0.5b \\
        recipes/qwen2.5-0.5b-mla.yaml+target_args.rank_allocation=uniform --layers 2

Prints one table: per operation, its count per step under each option set (plain, --fuse-projections,
--fold-absorbed, both), and the total; ``--json PATH`` writes the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from serving_at_scale import random_students, read_recipes
from transformers import AutoConfig, AutoModelForCausalLM

from attnedit.surgery.edit import teacher_on_attnedit

OPTIONS = {"plain": (False, False), "fused": (True, False), "folded": (False, True), "fused+folded": (True, True)}


def step_ops(model, fuse: bool, fold: bool, prompt: int = 8) -> collections.Counter:
    """ATen operations of one compiled decode step (batch 1, after a ``prompt``-token prefill)."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    model.fuse_projections(fuse)
    if hasattr(model, "fold_absorbed"):
        model.fold_absorbed(fold)
    ops: collections.Counter = collections.Counter()

    def backend(gm, inputs):
        def count(graph_module, _):
            for node in graph_module.graph.nodes:
                if node.op == "call_function":
                    ops[getattr(node.target, "__name__", str(node.target)).split(".")[0]] += 1
            return make_boxed_func(graph_module.forward)

        return aot_module_simplified(gm, inputs, fw_compiler=count)

    ids = torch.randint(3, model.config.vocab_size, (1, prompt))
    cache = model.new_cache(static=True, batch_size=1, max_length=prompt + 4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        torch._dynamo.reset()
        step = torch.compile(model, backend=backend, fullgraph=True)
        step(input_ids=ids[:, -1:].clone(), past_key_values=cache, use_cache=True, logits_to_keep=1)
    model.fuse_projections(False)
    if hasattr(model, "fold_absorbed"):
        model.fold_absorbed(False)
    return ops


def table(name: str, counts: dict[str, collections.Counter]) -> str:
    names = sorted(set().union(*counts.values()))
    width = max(len(n) for n in [*names, "operation"])
    lines = [f"== {name}", f"{'operation':{width}s}" + "".join(f"{k:>14s}" for k in counts)]
    lines += [f"{op:{width}s}" + "".join(f"{c[op]:14d}" for c in counts.values()) for op in names]
    lines.append(f"{'total':{width}s}" + "".join(f"{sum(c.values()):14d}" for c in counts.values()))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="folder with the teacher's config.json")
    p.add_argument("recipes", nargs="+", help="recipes whose target settings make the students; RECIPE+KEY=VALUE[+...] changes settings")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build (counts are per step; per layer they repeat)")
    p.add_argument("--json", default=None, help="write the counts here")
    args = p.parse_args()
    recipes = read_recipes(p, args.recipes)
    config = AutoConfig.from_pretrained(args.config)
    config.num_hidden_layers = args.layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: args.layers]
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    models = {"teacher": teacher_on_attnedit(teacher), **{name: m.eval() for name, m in random_students(teacher, recipes).items()}}
    out = {}
    for name, model in models.items():
        counts = {label: step_ops(model, *flags) for label, flags in OPTIONS.items()}
        out[name] = {label: dict(c) for label, c in counts.items()}
        print(table(f"{name}, {args.layers} layers", counts), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "layers": args.layers, "ops": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
