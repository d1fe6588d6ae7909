"""What stays full under a KV budget (surgery/selection.py): the count a budget allows, the choice by what
windowing costs on long-range targets, and convert measuring it on the run's data and reusing it on resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_teacher
from transformers import LlamaConfig, LlamaForCausalLM

from attnedit.data.recall import long_range_blocks
from attnedit.eval.kv import kv_summary
from attnedit.surgery import edited_config
from attnedit.surgery.selection import resolve_auto


def kv_fraction(config, teacher_config, context: int) -> float:
    return kv_summary(config, context)["kv_bytes_per_token"] / kv_summary(teacher_config, context)["kv_bytes_per_token"]


@pytest.mark.parametrize("key,unit,count", [("full_heads", "heads", 2), ("full_layers", "layers", 1)])
def test_a_budget_keeps_as_many_units_full_as_fit(key, unit, count):
    """Tiny llama: 4 layers x 2 KV heads x 16 dims, window 8 at context 64 caches 1/8 of a full head. A head made
    full adds (1 - 1/8) / 8 of the teacher's KV, a layer twice that: a budget of 35% holds 2 heads or 1 layer."""
    teacher = tiny_teacher("llama")
    other = "full_layers" if key == "full_heads" else "full_heads"
    args = {"window": 8, "sink": 0, other: "none"}
    config = edited_config(teacher.config, "gateswa", {**args, key: "auto@0.35:64"})
    layers = config.layer_attention
    kept = sum(len(x.get("full_kv_heads") or []) for x in layers) if unit == "heads" else sum(x["layer_type"] == "full" for x in layers)
    assert kept == count
    fraction = kv_fraction(config, teacher.config, 64)
    assert fraction == pytest.approx(1 / 8 + count * (7 / 8) / (8 if unit == "heads" else 4)) and fraction <= 0.35
    more = edited_config(teacher.config, "gateswa", {**args, key: f"auto:{count + 1}"})
    assert kv_fraction(more, teacher.config, 64) > 0.35  # one more would not fit
    exact = edited_config(teacher.config, "gateswa", {**args, key: f"auto@{fraction}:64"})  # a budget met exactly
    assert kv_fraction(exact, teacher.config, 64) == pytest.approx(fraction)


# A two-layer Llama built so that the answer is known. Layer 0, KV head 0: a previous-token head (RoPE at the highest
# frequencies peaks one token back), writing the previous token's code into the residual. Layer 1, KV head 0: an
# induction head, matching the current token's code against each key's previous-token code in dimensions RoPE
# barely rotates, and otherwise attending to the first token (a sink with no code): it matters only where a token
# repeats, i.e. in a recall span's copy. Layer 1, KV head 1: a plain averaging head with a large output, whose
# windowing changes every position a little. Blocks of distinct tokens. Windowing the averaging head costs more KL
# over all positions; windowing the induction head costs much more where a copy is predicted from far back.
V, T, WINDOW, SINK = 2048, 1024, 16, 1


def _retrieval_teacher():
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=T, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e9})  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    code, const, sink = slice(0, 18), 36, 37  # residual dimensions (18-35: the previous token's code)
    slow = torch.tensor([*range(6, 15), *range(22, 31)])  # head dimensions whose RoPE pairs barely turn over T tokens
    eye = torch.arange(18)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [x for layer in model.model.layers for x in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, code] = 4 * torch.nn.functional.normalize(torch.randn(V, 18, generator=torch.Generator().manual_seed(1)), dim=-1)
        emb[:, const] = 4.0
        emb[0, code], emb[0, sink] = 0.0, 4.0
        model.lm_head.weight.copy_(torch.randn(V, 64, generator=torch.Generator().manual_seed(2)))
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        for i in range(3):  # previous-token head (query head 0): q . k peaks at a distance of one token
            w = 1e9 ** (-i / 16)
            a0.q_proj.weight[i, const], a0.q_proj.weight[i + 16, const] = 30 * math.cos(-w), 30 * math.sin(-w)
            a0.k_proj.weight[i, const] = 1.0
        a0.v_proj.weight[eye, eye] = 1.0
        a0.o_proj.weight[18 + eye, eye] = 1.0  # -> the previous token's code
        a1.q_proj.weight[slow, eye] = 6.0  # induction head (query head 0)
        a1.k_proj.weight[slow, 18 + eye] = 1.0
        a1.q_proj.weight[15, const], a1.k_proj.weight[15, sink] = 6.0, 1.0  # by default: the first token
        a1.v_proj.weight[eye, eye] = 1.0
        a1.o_proj.weight[40 + eye, eye] = 1.0
        a1.v_proj.weight[32 + eye, eye] = 1.0  # averaging head (query head 2): q = 0
        a1.o_proj.weight[40 + eye, 64 + eye] = 1.0
    return model


def _distinct_blocks(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(V - 1, generator=g)[:T] + 1 for _ in range(n)])
    ids[:, 0] = 0
    return ids


@pytest.mark.slow
def test_the_long_range_score_keeps_the_retrieval_head_full():
    teacher, ids = _retrieval_teacher(), _distinct_blocks()
    args = {"window": WINDOW, "sink": SINK, "full_layers": "none", "full_heads": "auto@0.3:1024"}  # room for one head
    by_kl, kl = resolve_auto(teacher, {**args, "auto_score": "kl"}, lambda: ids)
    by_recall, recall = resolve_auto(teacher, {**args, "auto_score": "recall"}, lambda: ids, long_range=long_range_blocks)
    assert kl["candidates"] == recall["candidates"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and kl["count"] == 1
    assert by_kl["full_heads"] == "1.1" and kl["chosen"] == [[1, 1]], kl  # short-range KL: the averaging head
    assert by_recall["full_heads"] == "1.0" and recall["chosen"] == [[1, 0]], recall  # long-range: the induction head
    assert recall["scores_recall"][2] > 2 * recall["scores_recall"][3] and recall["recall_targets"] > 0
    assert resolve_auto(teacher, {**args, "auto_score": "recall"}, lambda: pytest.fail("measured"), recall)[0] == by_recall


@pytest.mark.slow
def test_convert_measures_the_heads_on_its_data_and_reuses_them_on_resume(tmp_path, monkeypatch):
    from test_stages import make_docs, make_teacher_dir, tiny_raw

    from attnedit.recipe import parse_recipe
    from attnedit.stages import convert
    from attnedit.surgery import sensitivity

    raw = tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), target="gateswa",
                   stage1__steps=2, stage2__steps=2, stage2__recall_fraction=1.0, stage2__recall_min_distance=9,
                   stage2__seq_len=80, checkpoint_every=1)  # fmt: skip
    raw["target_args"] = {"window": 8, "sink": 1, "full_layers": "none", "full_heads": "auto:3", "auto_score": "recall", "auto_seq_len": 96}
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    record = json.loads((tmp_path / "run" / "full_layers.json").read_text())
    assert record["unit"] == "heads" and record["calibration"] == [8, 96] and len(record["scores_recall"]) == 8
    assert len(record["chosen"]) == 3
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    layers = config["layer_attention"]  # a layer whose every KV head was chosen becomes a full layer
    kept = [[i, h] for i, x in enumerate(layers) for h in (range(2) if x["layer_type"] == "full" else x.get("full_kv_heads") or [])]
    assert kept == record["chosen"]
    assert summary.get("full_heads", []) == [u for u in kept if layers[u[0]]["layer_type"] == "sliding"]
    monkeypatch.setattr(sensitivity, "windowing_costs", lambda *a, **k: pytest.fail("measured again"))
    (tmp_path / "run" / "summary.json").unlink()
    convert(parse_recipe(raw), tmp_path / "run", resume=True, progress="none")
