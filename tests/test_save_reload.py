"""An edited model saves as a plain HF checkpoint and reloads, in a fresh process without attnedit,
with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import tiny_ids, tiny_teacher

from attnedit.export import save_edited
from attnedit.surgery import edit_model

RELOAD = textwrap.dedent(
    """
    import sys, torch
    sys.modules["attnedit"] = None  # importing attnedit would fail: the checkpoint must not need it
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ref = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ref["ids"]).logits
        out = model.generate(ref["ids"], attention_mask=torch.ones_like(ref["ids"]), max_new_tokens=5, do_sample=False)
    print(float((logits - ref["logits"]).abs().max()), tuple(out.shape), type(model).__name__)
    """
)


@pytest.mark.parametrize(
    "family,target,args",
    [
        ("llama", "mla", {"q_lora_rank": 16}),
        ("qwen3", "gateswa", {"window": 4, "full_layers": "every:2"}),
        ("qwen3_moe", "mla", {"layers": "1-2"}),
        ("qwen2", "gateswa", {"gate": "headwise", "init": "teacher", "window": 5}),
    ],
)
def test_reload_in_fresh_process_gives_same_logits(tmp_path, family, target, args):
    student = edit_model(tiny_teacher(family), target, args)
    with torch.no_grad():  # train-like perturbation so a silently re-initialised weight would show
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_edited(student, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "modeling_attnedit.py").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_attnedit.AttnEditForCausalLM"
    ids = tiny_ids(length=11)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": student(ids).logits}, tmp_path / "ref.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "ref.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1].split()[0]) == 0.0, res.stdout
    assert "(2, 16)" in res.stdout and "AttnEditForCausalLM" in res.stdout


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    from attnedit.errors import AttnEditError

    student = edit_model(tiny_teacher("llama"), "mla", {})
    out = save_edited(student, tmp_path / "m")
    with pytest.raises(AttnEditError, match="already exists"):
        save_edited(student, out)
    save_edited(student, out, overwrite=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert leftovers == []
