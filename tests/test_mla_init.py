"""MLA's initialisation from the teacher (surgery/mla_init.py) on tiny teachers of every family: the RoPE merge
across KV heads, the latent factorisation at full rank, QK-norm's linear fit, biases, the steady latent channel,
and the per-layer rank allocation (cached decoding, KV bytes, save/reload, the export's refusal)."""

from __future__ import annotations

import pytest
import torch
from tiny import COMMON, FAMILY_NAMES, tiny_ids, tiny_teacher
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnedit import AttnEditError
from attnedit.eval.kv import kv_summary
from attnedit.families import family_for
from attnedit.surgery import edit_model
from attnedit.surgery.mla_init import LayerStats, allocate_ranks, factor_layer, normalised_qk

F64 = torch.float64


def _stats(teacher, layer: int, n_seqs: int = 16, length: int = 24) -> tuple[LayerStats, torch.Tensor, dict]:
    """Calibration statistics of one layer's attention input, and held-out inputs of it."""
    family = family_for(teacher.config)
    spec = family.attention_spec(teacher.config)
    attn = family.attention(teacher, layer)
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None).detach()), with_kwargs=True)
    with torch.no_grad():
        teacher(tiny_ids(n_seqs, length, seed=3))
        teacher(tiny_ids(4, length, seed=9))
    handle.remove()
    stats = LayerStats()
    stats.add(seen[0], attn, spec)
    return stats, seen[1].reshape(-1, seen[1].shape[-1]).to(F64), spec


def _teacher_qkv(attn, x, spec):
    """The teacher's per-head queries and keys before RoPE (after QK-norm) and values, [tokens, heads, d]."""
    d = spec["head_dim"]
    if spec["qk_norm"]:
        q, k = normalised_qk(attn, x, spec)
    else:
        q = x @ attn.q_proj.weight.to(F64).T + (attn.q_proj.bias.to(F64) if attn.q_proj.bias is not None else 0)
        k = x @ attn.k_proj.weight.to(F64).T + (attn.k_proj.bias.to(F64) if attn.k_proj.bias is not None else 0)
    v = x @ attn.v_proj.weight.to(F64).T
    return q.view(len(x), -1, d), k.view(len(x), -1, d), v.view(len(x), -1, d)


def _augment(x, bias):
    return torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1) if bias else x


def _proportional_keys(attn, spec) -> None:
    """Make every KV head's key a complex multiple of KV head 0's, pair by pair (a rotation and a scale, which RoPE
    commutes with): the case where one shared RoPE key loses nothing, if the merge finds the multiples."""
    d, g = spec["head_dim"], spec["num_kv_heads"]
    half = d // 2
    with torch.no_grad():
        w = attn.k_proj.weight.view(g, d, -1)
        b = attn.k_proj.bias.view(g, d) if attn.k_proj.bias is not None else None
        for j in range(1, g):
            z = torch.polar(torch.linspace(0.5, 2.0, half), torch.linspace(-2.0, 2.5, half) * j)
            for t in (w, b) if b is not None else (w,):
                re, im = t[0, :half].clone(), t[0, half:].clone()
                zr, zi = (z.real[:, None], z.imag[:, None]) if t.dim() == 3 else (z.real, z.imag)
                t[j, :half] = zr * re - zi * im
                t[j, half:] = zi * re + zr * im


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if not f.startswith("qwen3")])
def test_full_rank_factors_reproduce_the_teachers_scores_and_values(family):
    """With every RoPE pair kept (rope = head_dim), the KV heads' keys made complex multiples of each other (a
    rotation and scale per pair, which the merge must find) and the latent at full rank, the student's query/key
    products and values equal the teacher's (biases included). QK-norm (Qwen3) is not linear, so no factorisation
    is exact there: its least-squares fit is tested against the fold below."""
    teacher = tiny_teacher(family)
    family_ = family_for(teacher.config)
    attn = family_.attention(teacher, 1)
    spec = family_.attention_spec(teacher.config)
    d, g = spec["head_dim"], spec["num_kv_heads"]
    _proportional_keys(attn, spec)
    stats, x, spec = _stats(teacher, 1)
    bias = bool(spec["qkv_bias"])
    f = factor_layer(attn, attn.o_proj.weight, spec, stats, rope=d, bias=bias)
    assert f.nope == 0
    q, k, v = _teacher_qkv(attn, x, spec)
    xt = _augment(x, bias)
    q_s = (xt @ f.q_rows.T).view(len(x), -1, d)  # [tokens, heads, rope] in the student's half-split layout
    k_s = xt @ f.kpe_rows.T  # the one shared RoPE key
    group = spec["num_heads"] // g
    # scores of every query token against every key token, head by head (RoPE would rotate both alike)
    ref = torch.einsum("ahd,bhd->hab", q, k.repeat_interleave(group, 1))
    got = torch.einsum("ahd,bd->hab", q_s, k_s)
    assert (got - ref).norm() / ref.norm() < 1e-6  # the tweaked key weights are float32
    a, b = f.latent(g * d)  # every value dim of every KV head
    v_s = (xt @ b.T @ a.T).view(len(x), g, d)
    assert (v_s - v).norm() / v.norm() < 1e-8
    if bias:  # the value bias is not in the latent: it is folded into o_proj's bias exactly
        assert f.vt.shape[1] == x.shape[1] + 1


def test_qk_norm_fit_beats_the_mean_scale_fold():
    """Qwen3's normalised keys: the least-squares linear map is closer than folding the norm's weight and mean scale."""
    teacher = tiny_teacher("qwen3")
    family = family_for(teacher.config)
    attn = family.attention(teacher, 2)
    stats, x, spec = _stats(teacher, 2)
    f = factor_layer(attn, attn.o_proj.weight, spec, stats, rope=spec["head_dim"], bias=False)
    _, k, _ = _teacher_qkv(attn, x, spec)
    d = spec["head_dim"]
    proj = (x @ attn.k_proj.weight.to(F64).T).view(len(x), -1, d)
    fold = proj * attn.k_norm.weight.to(F64) / proj.pow(2).mean(-1, keepdim=True).sqrt().mean(0, keepdim=True)
    fit = torch.linalg.lstsq(x, k.reshape(len(x), -1)).solution  # the best linear map on these held-out inputs
    best = (x @ fit).view_as(k)
    assert (best - k).norm() < (fold - k).norm()
    assert f.q_rows.shape[0] == spec["num_heads"] * d


@pytest.mark.parametrize("weighting", ["tokens", "attention"])
def test_teacher_init_reproduces_a_biased_teacher_at_full_rank(weighting):
    """Model level: a teacher with biases (Qwen2) whose two KV heads' keys are complex multiples of each other, every
    RoPE pair kept and the latent wide enough for the values plus the steady channel (49 of the teacher's 64 values
    a token): the student's logits are the teacher's (the intercept keeps the latent RMSNorm's divisor constant),
    whichever way the calibration tokens are weighted."""
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(**COMMON)).eval()
    family = family_for(teacher.config)
    spec = family.attention_spec(teacher.config)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    for i in range(teacher.config.num_hidden_layers):
        _proportional_keys(family.attention(teacher, i), spec)
    d = spec["head_dim"]
    settings = {"init": "teacher", "qk_rope_head_dim": d, "kv_lora_rank": 2 * d + 1, "init_weighting": weighting}
    student = edit_model(teacher, "mla", settings, calibration_ids=tiny_ids(16, 32, seed=5))
    ids = tiny_ids(3, 20, seed=8)
    with torch.no_grad():
        ref, got = teacher(ids).logits, student(ids).logits
    assert (got - ref).norm() / ref.norm() < 1e-4


def test_allocate_ranks():
    spectra = [torch.tensor([10.0, 9, 8, 1, 1, 1, 0.5, 0.1]), torch.tensor([1.0, 0.5, 0.2, 0.1, 0, 0, 0, 0]), torch.ones(8)]
    ranks = allocate_ranks(spectra, [1.0, 1.0, 1.0], total=12, step=2, least=2)
    assert sum(ranks) == 12 and all(2 <= r <= 8 for r in ranks)
    assert ranks[0] >= ranks[1] and ranks[1] == 2  # the flat, small spectrum gets the least
    # a layer whose error costs a hundred times more per unit gets rank it would not have had
    heavy = allocate_ranks(spectra, [1.0, 0.01, 1.0], total=12, step=2, least=2)
    assert heavy[1] > ranks[1]
    with pytest.raises(ValueError):
        allocate_ranks(spectra, [1.0] * 3, total=4, step=2, least=2)


@torch.no_grad()
def test_rank_allocation_auto_keeps_the_budget_and_decodes():
    teacher = tiny_teacher("qwen2")
    calib = tiny_ids(8, 32, seed=5)
    uniform = edit_model(teacher, "mla", {"init": "teacher", "kv_lora_rank": 16}, calibration_ids=calib)
    auto = edit_model(teacher, "mla", {"init": "teacher", "kv_lora_rank": 16, "rank_allocation": "auto"}, calibration_ids=calib)
    ranks = [x["kv_lora_rank"] for x in auto.config.layer_attention]
    assert sum(ranks) == 16 * len(ranks) and len(set(ranks)) > 1
    assert kv_summary(auto.config, 64)["kv_bytes_per_token"] == kv_summary(uniform.config, 64)["kv_bytes_per_token"]
    ids = tiny_ids(2, 19)
    full = auto(ids).logits
    cache = auto.new_cache(static=True, batch_size=2, max_length=19)
    steps = [auto(ids[:, :7], past_key_values=cache, use_cache=True).logits]
    for t in range(7, 19):
        steps.append(auto(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.allocated_bytes() == kv_summary(auto.config, 19, dtype="float32")["kv_bytes_total"] * 2


def test_rank_allocation_setting_is_checked_and_export_says_why(tmp_path):
    teacher = tiny_teacher("llama")
    with pytest.raises(AttnEditError, match="needs init=teacher"):
        edit_model(teacher, "mla", {"rank_allocation": "auto"})
    with pytest.raises(AttnEditError, match="rank_allocation='maybe'"):
        edit_model(teacher, "mla", {"rank_allocation": "maybe"})
    from attnedit.export.deepseek import export_deepseek_v3

    auto = edit_model(teacher, "mla", {"init": "teacher", "rank_allocation": "auto", "kv_lora_rank": 16}, calibration_ids=tiny_ids(8, 32))
    with pytest.raises(AttnEditError, match="rank_allocation=uniform"):
        export_deepseek_v3(auto, tmp_path / "ds")


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if not f.startswith("qwen3")] + ["qwen3"])
@torch.no_grad()
def test_the_steady_channel_enters_kv_b_at_the_size_of_the_others(family):
    """The steady latent channel (the last) reaches kv_b_proj, through a zero column, at the size of the other channels:
    sized like its pre-norm value (a multiple of the whole latent's norm) it made the first optimiser steps on that
    column add a value hundreds of times a key's size to every key and value, and stage 1 diverged on SmolLM2."""
    teacher = tiny_teacher(family)
    student = edit_model(teacher, "mla", {"init": "teacher", "kv_lora_rank": 16}, calibration_ids=tiny_ids(8, 32, seed=5))
    seen = []
    norms = [a.kv_a_layernorm for a in student.attentions()]
    handles = [n.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1]))) for n in norms]
    student(tiny_ids(4, 24, seed=9))
    for h in handles:
        h.remove()
    for out, attn in zip(seen, student.attentions(), strict=True):
        assert attn.kv_b_proj.weight[:, -1].abs().max() == 0  # the steady channel adds nothing at the start
        rms = out.pow(2).mean(0).sqrt()
        ratio = float(rms[-1] / rms[:-1].pow(2).mean().sqrt())
        assert 0.5 < ratio < 2, ratio


@pytest.mark.parametrize(
    "family,layer",
    [("llama", 1), ("qwen2", 1), ("qwen3", 1), ("gemma2", 0), ("gemma2", 1), ("gemma3", 0), ("olmo2", 1), ("olmo3", 0), ("granite", 1), ("mistral-window", 1)],
)
@torch.no_grad()
def test_attention_mass_is_the_teachers_attention_summed_over_its_queries(family, layer):
    """``attention_mass`` recomputes the teacher's attention from its layer input: per token, the attention the
    block's queries give it (eager attention's weights, summed over queries, averaged over heads), mean 1; with the
    families' QK-norms, softmax scales, soft caps, sliding layers (layer 0 of gemma2/3 and olmo3; every layer of a
    Mistral with a window, which has no ``layer_types``) and per-layer RoPE, each as ``teacher_rope_and_window``
    (what ``collect_stats`` uses) reads them from the family."""
    from transformers import MistralConfig, MistralForCausalLM

    from attnedit.surgery.mla_init import attention_mass, teacher_rope_and_window

    if family == "mistral-window":
        torch.manual_seed(0)
        teacher = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)).eval()
    else:
        teacher = tiny_teacher(family)
    teacher.config._attn_implementation = "eager"
    family_ = family_for(teacher.config)
    spec = family_.attention_spec(teacher.config)
    attn = family_.attention(teacher, layer)
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    ids = tiny_ids(2, 20, seed=4)
    out = teacher(ids, output_attentions=True)
    handle.remove()
    probs = out.attentions[layer]  # [batch, heads, queries, keys]
    expected = probs.sum(-2).mean(1)
    expected = expected * (ids.shape[1] / expected.sum(-1, keepdim=True))
    rotary, window = teacher_rope_and_window(teacher.config, family_, spec, layer)
    mass = attention_mass(seen[0].to(F64), family_.projections(teacher, layer), spec, rotary, window)
    torch.testing.assert_close(mass.float(), expected.float(), atol=1e-4, rtol=1e-4)
    assert torch.allclose(mass.sum(-1), torch.full((2,), 20.0, dtype=F64))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_attention_weighted_start_differs_from_the_token_weighted_one_and_decodes(family):
    """``init_weighting: attention`` fits the keys and values where the teacher's queries read them: a different
    start from weighting every token alike (what it is worth is measured on real teachers, docs/results.md), and
    its cache decodes as the full forward does."""
    teacher = tiny_teacher(family)
    calib = tiny_ids(8, 32, seed=5)
    base = {"init": "teacher", "kv_lora_rank": 8}
    tokens = edit_model(teacher, "mla", base, calibration_ids=calib)
    attention = edit_model(teacher, "mla", {**base, "init_weighting": "attention"}, calibration_ids=calib)
    assert attention.config.edit["settings"]["init_weighting"] == "attention"
    a, b = (m.model.layers[1].self_attn.kv_a_proj_with_mqa.weight for m in (attention, tokens))
    assert not torch.allclose(a, b, atol=1e-4)
    ids = tiny_ids(2, 15)
    cache = attention.new_cache(static=True, batch_size=2, max_length=15)
    steps = [attention(ids[:, :6], past_key_values=cache, use_cache=True).logits]
    steps += [attention(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), attention(ids).logits, atol=1e-5, rtol=1e-4)


def test_init_weighting_setting_is_checked():
    with pytest.raises(AttnEditError, match="init_weighting='queries'"):
        edit_model(tiny_teacher("llama"), "mla", {"init": "teacher", "init_weighting": "queries"})
    with pytest.raises(AttnEditError, match="needs init=teacher"):
        edit_model(tiny_teacher("llama"), "mla", {"init_weighting": "attention"})


def test_the_plan_says_when_mlas_rope_key_turns_slower_pairs_into_positionless_latent():
    """An MLA RoPE key whose slowest kept pair turns in fewer tokens than the context is named in the notes (with
    its wavelength, 2 pi theta^((rope - 2) / rope)); one that keeps every pair, or a context inside the wavelength,
    is not."""
    import math

    from attnedit.eval.inspect import rope_notes, rope_wavelength
    from attnedit.surgery import edited_config

    config = tiny_teacher("llama").config  # head_dim 16, RoPE base 10,000, 512 positions
    half = edited_config(config, "mla", {"qk_rope_head_dim": 8})
    wave = rope_wavelength(half.layer_attention[0])
    assert wave == pytest.approx(2 * math.pi * (10000 ** (8 / 16)) ** (6 / 8))  # the student's base: theta^(rope/d)
    assert any("wavelength of 199 tokens, under the context of 512" in n for n in rope_notes(half))
    assert not rope_notes(half, context=128)
    assert not rope_notes(edited_config(config, "mla", {"qk_rope_head_dim": 16}))  # every pair keeps its position
    assert not rope_notes(edited_config(config, "gateswa", {"window": 8, "full_layers": "1"}))
