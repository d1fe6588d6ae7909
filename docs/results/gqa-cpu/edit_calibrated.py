"""SmolLM2-135M's GQA start (1 KV head instead of 3), calibrated on blocks of recipes/smollm2-gqa.yaml's own
training data as `attnedit convert` calibrates it (`attnedit edit` uses random token ids), aligned and plainly
averaged: python docs/results/gqa-cpu/edit_calibrated.py OUT_DIR (writes OUT_DIR/real-aligned, OUT_DIR/real-plain)."""

import sys
from pathlib import Path

from attnedit.data import resolve_tokenizer
from attnedit.export import save_edited
from attnedit.recipe import load_recipe
from attnedit.stages.convert import calibration_ids
from attnedit.surgery import edit_model
from attnedit.teachers import load_model

out = Path(sys.argv[1])
recipe = load_recipe("recipes/smollm2-gqa.yaml", {"device": "cpu"})
teacher, tok = load_model(recipe.teacher)
tok = resolve_tokenizer(recipe.data, tok, teacher.config.vocab_size)
ids = calibration_ids(recipe, tok, teacher.config.hidden_size)
print("calibration blocks", tuple(ids.shape))
for align in (True, False):
    student = edit_model(teacher, "gqa", {**recipe.target_args, "align": align}, calibration_ids=ids)
    save_edited(student, out / f"real-{'aligned' if align else 'plain'}", tok, overwrite=True, teacher=recipe.teacher)
