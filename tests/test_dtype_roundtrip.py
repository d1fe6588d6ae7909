"""A converted folder loads entirely in the dtype asked for, whatever dtype it was saved in.

The teacher's ``dtype`` travels inside ``base_config``; the backbone must not be built from it.
"""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_NAMES, tiny_ids, tiny_teacher

from attnedit.export import save_edited
from attnedit.surgery import edit_model

ARGS = {"mla": {"init": "teacher"}, "gateswa": {"window": 4, "full_layers": "every:2"}}


def _saved(tmp_path, family, target, saved_dtype):
    teacher = tiny_teacher(family).to(saved_dtype)
    teacher.config.dtype = saved_dtype  # as a real checkpoint's config says (tiny ones say nothing)
    student = edit_model(teacher, target, ARGS[target])
    return save_edited(student, tmp_path / f"{family}-{target}"), student


@pytest.mark.parametrize("target", ["mla", "gateswa"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("saved,loaded", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_stock_from_pretrained_gives_one_dtype(tmp_path, monkeypatch, family, target, saved, loaded):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    out, student = _saved(tmp_path, family, target, saved)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=loaded).eval()
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != loaded}
    assert not wrong, list(wrong.items())[:3]
    ids = tiny_ids(length=9)
    with torch.no_grad():
        logits = model(ids).logits
        want = student.to(loaded).eval()(ids).logits  # the saved weights, cast in memory: the same numbers
    assert logits.dtype == loaded
    torch.testing.assert_close(logits, want)
