"""One-shot quality of an MLA start from the teacher: held-out KL(teacher || student) and both CEs of the edited,
untrained model, on blocks of the data's held-out split, for one or more sets of target settings.

    python benchmarks/mla_oneshot.py smollm2-135m --set kv_lora_rank=96 --set qk_rope_head_dim=32 \\
        --variant '{}' --variant '{"rank_allocation": "auto"}'

The recipe (default recipes/smollm2-mla.yaml) gives the data; calibration takes blocks of its training data as
``convert`` does (``--calib-blocks N`` blocks of ``--calib-len`` tokens instead, 512 by default). ``--seq-len`` sets
the held-out blocks' length: the start's error at long context shows at the length stage 2 trains on. Runs on the CPU (float32) or ``--device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

from attnedit.data import heldout_blocks, resolve_tokenizer
from attnedit.recipe import load_recipe
from attnedit.stages import stage2
from attnedit.stages.context import calibration_ids, training_blocks
from attnedit.surgery import edit_model
from attnedit.teachers import load_model


def kl_by_position(teacher, student, blocks: torch.Tensor, bucket: int) -> list[float]:
    """Mean KL(teacher || student) of the next-token distributions in each bucket of ``bucket`` positions."""
    sums = torch.zeros(-(-blocks.shape[1] // bucket), dtype=torch.float64)
    transform = stage2.logit_transform(student)  # the family's logit post-processing (Granite, Gemma), both models

    def log_probs(head, h):
        return stage2._transformed(head(h).float(), transform)[0].log_softmax(-1)

    for ids in blocks.split(1):
        t_h = stage2.teacher_hidden(teacher, ids, False)[-1]
        s_h = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        for k, s in enumerate(range(0, ids.shape[1], bucket)):
            lt = log_probs(teacher.get_output_embeddings(), t_h[:, s : s + bucket])
            ls = log_probs(student.lm_head, s_h[:, s : s + bucket])
            sums[k] += (lt.exp() * (lt - ls)).sum(-1).mean().item()
    return [round(v, 4) for v in (sums / blocks.shape[0]).tolist()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("--recipe", default="recipes/smollm2-mla.yaml", help="whose data to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="target setting of every variant")
    p.add_argument("--variant", action="append", default=[], help="JSON of settings for one variant (default: one, '{}')")
    p.add_argument("--heldout-blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-blocks", type=int, default=0, help="blocks of --calib-len training tokens (default: convert's rule)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration block with --calib-blocks")
    p.add_argument(
        "--by-position", type=int, default=0, metavar="N", help="also the KL in buckets of N positions of the held-out blocks (does the start err more far in?)"
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    recipe = load_recipe(args.recipe, {"teacher": args.teacher})
    teacher, tok = load_model(args.teacher, dtype=torch.float32, device=device)
    teacher.requires_grad_(False)
    tokenizer = resolve_tokenizer(recipe.data, tok, teacher.config.vocab_size)
    held = heldout_blocks(dataclasses.replace(recipe.data, seq_len=args.seq_len, heldout_blocks=args.heldout_blocks), tokenizer)
    if args.calib_blocks:
        calib = training_blocks(recipe, tokenizer, args.calib_len, args.calib_blocks)
    else:
        calib = calibration_ids(recipe, tokenizer, teacher.config.hidden_size)
    base = {"init": "teacher", **dict(kv.split("=", 1) for kv in args.set)}
    print(f"held-out {tuple(held.shape)}, calibration {tuple(calib.shape)}", flush=True)
    for variant in args.variant or ["{}"]:
        t0 = time.time()
        student = edit_model(teacher, "mla", {**base, **json.loads(variant)}, calibration_ids=calib)
        with torch.no_grad():
            losses = stage2.heldout_losses(teacher, student, held, 2, 512, contextlib.nullcontext)
            if args.by_position:
                losses["kl_by_position"] = kl_by_position(teacher, student, held, args.by_position)
        ranks = [x["kv_lora_rank"] for x in student.config.layer_attention if x.get("kind") == "mla"]
        print(json.dumps({"variant": json.loads(variant), **losses, "ranks": ranks, "seconds": round(time.time() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
