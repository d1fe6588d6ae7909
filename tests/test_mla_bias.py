"""MLA keeps the teacher's q/k/v biases (Qwen2) where the math allows, and ``convert``
calibrates the MLA factorisation on blocks of the run's own data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_ids, tiny_teacher

from attnedit import AttnEditError
from attnedit.surgery import edit_model


@pytest.fixture(scope="module")
def qwen2():
    """A tiny Qwen2 teacher with Qwen2-sized attention biases and a peaked next-token distribution, plus
    calibration and held-out sequences sampled from it (so its CE is its entropy, about 2.3 nats)."""
    torch.manual_seed(0)
    teacher = tiny_teacher("qwen2")
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("bias"):
                p.mul_(20)
        teacher.lm_head.weight.mul_(15)
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight.mul_(4)

    def sample(n, length, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 96, (n, 1), generator=g)
        with torch.no_grad():
            for _ in range(length - 1):
                probs = F.softmax(teacher(ids).logits[:, -1].float(), -1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
        return ids

    return teacher, sample(8, 32, 1), sample(8, 32, 2)


def held_out_ce(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def test_teacher_init_keeps_qwen2_biases_and_starts_near_the_teacher(qwen2):
    teacher, calib, held = qwen2
    ce_teacher = held_out_ce(teacher, held)
    with_bias = edit_model(teacher, "mla", {"init": "teacher", "kv_lora_rank": 24}, calibration_ids=calib)
    without = edit_model(teacher, "mla", {"init": "teacher", "kv_lora_rank": 24, "bias": "false"}, calibration_ids=calib)
    assert with_bias.config.layer_attention[0]["bias"] is True  # auto: Qwen2 has q/k/v biases
    assert without.model.layers[0].self_attn.o_proj.bias is None
    ce_bias, ce_none = held_out_ce(with_bias, held), held_out_ce(without, held)
    print(f"held-out CE: teacher {ce_teacher:.3f}, MLA init with biases {ce_bias:.3f}, biases dropped {ce_none:.3f}")
    assert ce_bias < ce_teacher * 1.05 + 0.05  # measured 2.272 vs 2.272
    assert ce_none > ce_teacher + 2.0  # measured 8.6 vs 2.27: what teacher init gave before


def test_bias_setting_in_random_init_and_families_without_biases():
    llama = edit_model(tiny_teacher("llama"), "mla", {})
    assert llama.config.layer_attention[0]["bias"] is False and llama.model.layers[0].self_attn.q_proj.bias is None
    forced = edit_model(tiny_teacher("llama"), "mla", {"bias": "true", "q_lora_rank": 16})
    attn = forced.model.layers[0].self_attn
    assert attn.q_b_proj.bias is not None and torch.equal(attn.o_proj.bias, torch.zeros_like(attn.o_proj.bias))
    with pytest.raises(AttnEditError, match="bias='maybe'"):
        edit_model(tiny_teacher("llama"), "mla", {"bias": "maybe"})


def test_biased_model_saves_reloads_and_decodes_through_its_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from attnedit.export import save_edited

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    student = edit_model(tiny_teacher("qwen2"), "mla", {"init": "teacher"})
    out = save_edited(student, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = tiny_ids(1, 10)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, student(ids).logits, atol=1e-5)
        full = model(ids).logits[:, -1]
        cache = model.new_cache()
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_deepseek_export_refuses_a_biased_mla_model(tmp_path):
    from attnedit.export.deepseek import export_deepseek_v3

    student = edit_model(tiny_teacher("qwen2"), "mla", {})
    with pytest.raises(AttnEditError, match="bias=false") as e:
        export_deepseek_v3(student, tmp_path / "ds")
    assert "\n" not in str(e.value) and not (tmp_path / "ds").exists()


def test_convert_calibrates_mla_on_the_runs_data(tmp_path, monkeypatch):
    from test_stages import char_tokenizer, make_docs, make_teacher_dir, tiny_raw

    import attnedit.surgery as surgery
    from attnedit.recipe import parse_recipe
    from attnedit.stages import convert

    seen = {}
    real = surgery.edit_model

    def spy(teacher, target, args=None, calibration_ids=None):
        seen["ids"] = calibration_ids
        return real(teacher, target, args, calibration_ids=calibration_ids)

    monkeypatch.setattr(surgery, "edit_model", spy)
    raw = tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), stage1__steps=1, stage2__steps=0, heldout_eval=False)
    raw["target_args"] = {"init": "teacher"}
    convert(parse_recipe(raw), tmp_path / "run", progress="none")
    ids = seen["ids"]
    assert ids is not None and ids.shape[1] == 32 and ids.shape[0] >= 4
    tok = char_tokenizer()
    allowed = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz ."} | {tok.eos_token_id}
    assert set(ids.flatten().tolist()) <= allowed, "blocks of the run's documents, not random token ids"
