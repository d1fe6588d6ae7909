"""Exports load in stock code and reproduce the attnedit model."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_ids, tiny_teacher
from transformers import AutoModelForCausalLM

from attnedit.errors import AttnEditError
from attnedit.export.deepseek import export_deepseek_v3
from attnedit.surgery import edit_model


@pytest.mark.parametrize("family,args", [("llama", {}), ("qwen3", {"q_lora_rank": 24}), ("qwen2", {"init": "teacher", "bias": "false"})])
def test_deepseek_v3_export_matches_stock_loader(tmp_path, family, args):
    student = edit_model(tiny_teacher(family), "mla", args)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_deepseek_v3(student, tmp_path / "ds")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "DeepseekV3ForCausalLM" and stock.config.model_type == "deepseek_v3"
    assert stock.config.rope_interleave and stock.config.first_k_dense_replace == stock.config.num_hidden_layers
    ids = tiny_ids(length=13)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-4)
        mask = torch.ones_like(ids)
        a = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = student.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "family,target,args,message",
    [
        ("llama", "mla", {"layers": "0-2"}, "needs every layer converted to MLA"),
        ("qwen3_moe", "mla", {}, "dense MLPs"),
        ("llama", "gateswa", {}, "this model is GateSWA, not MLA"),
    ],
)
def test_deepseek_v3_export_refuses_what_it_cannot_express(tmp_path, family, target, args, message):
    with pytest.raises(AttnEditError, match=message):
        export_deepseek_v3(edit_model(tiny_teacher(family), target, args), tmp_path / "ds")
