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
    import json, sys, torch
    sys.modules["attnedit"] = None  # importing attnedit would fail: the checkpoint must not need it
    from transformers import AutoModelForCausalLM
    for folder, ref_path in zip(sys.argv[1::2], sys.argv[2::2]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ref = torch.load(ref_path)
        with torch.no_grad():
            logits = model(ref["ids"]).logits
            out = model.generate(ref["ids"], attention_mask=torch.ones_like(ref["ids"]), max_new_tokens=5, do_sample=False)
        diff = float((logits - ref["logits"]).abs().max())
        print(json.dumps({"folder": folder, "diff": diff, "shape": list(out.shape), "class": type(model).__name__}))
    """
)

CASES = {
    "llama-mla": ("llama", "mla", {"q_lora_rank": 16}),
    "qwen3-gateswa": ("qwen3", "gateswa", {"window": 4, "full_layers": "every:2"}),
    "qwen3_moe-mla": ("qwen3_moe", "mla", {"layers": "1-2"}),
    "qwen2-gateswa": ("qwen2", "gateswa", {"gate": "headwise", "init": "teacher", "window": 5}),
}


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every case saved, then reloaded in one fresh process (one interpreter start-up, not one per case)."""
    root = tmp_path_factory.mktemp("reload")
    argv = []
    for name, (family, target, args) in CASES.items():
        student = edit_model(tiny_teacher(family), target, args)
        with torch.no_grad():  # train-like perturbation so a silently re-initialised weight would show
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out = save_edited(student, root / name)
        ids = tiny_ids(length=11)
        with torch.no_grad():
            torch.save({"ids": ids, "logits": student(ids).logits}, root / f"{name}.pt")
        argv += [str(out), str(root / f"{name}.pt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    res = subprocess.run([sys.executable, "-c", RELOAD, *argv], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["folder"] for r in rows] == argv[::2], res.stdout
    return {name: (root / name, row) for name, row in zip(CASES, rows)}


@pytest.mark.xdist_group("save-reload")
@pytest.mark.parametrize("case", list(CASES))
def test_reload_in_fresh_process_gives_same_logits(reloaded, case):
    out, row = reloaded[case]
    assert (out / "model.safetensors").is_file() and (out / "modeling_attnedit.py").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_attnedit.AttnEditForCausalLM"
    assert row["diff"] == 0.0, row
    assert row["shape"] == [2, 16] and row["class"] == "AttnEditForCausalLM"


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    from attnedit.errors import AttnEditError

    student = edit_model(tiny_teacher("llama"), "mla", {})
    out = save_edited(student, tmp_path / "m")
    with pytest.raises(AttnEditError, match="already exists"):
        save_edited(student, out)
    save_edited(student, out, overwrite=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert leftovers == []
