"""GateSWA layers that keep some KV heads full and window the others (``full_heads``, targets/split_heads.py):
the attention each query head computes, cached decoding equal to the full forward through growing and static
caches (chunked prefill, left padding, generate()), the bytes each cache holds against the analytic figure, the
settings' errors, and the exports: stock formats refuse in one line, the remote-code export reproduces it."""

from __future__ import annotations

import pytest
import torch
from test_static_cache import static_logits
from test_targets import check_decoding_and_bytes, incremental_logits
from tiny import FAMILY_NAMES, MORE_FAMILY_NAMES, perturbed, tiny_ids, tiny_teacher

from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.eval.kv import kv_summary, measured_cache_bytes
from attnedit.export import save_edited
from attnedit.export.check import check_export
from attnedit.export.stock import export_stock_swa
from attnedit.surgery import edit_model, edited_config
from attnedit.targets.common import AttentionContext
from attnedit.targets.kernels import window_mask
from attnedit.targets.split_heads import HeadSplit, SplitHeadsCacheLayer, split_attention

# layer 0 keeps KV head 1 full (its group comes after the windowed one: the output is put back in head order),
# layer 1 KV head 0 (already in order), layer 2 slides whole, layer 3 is full
SPLIT = {"window": 5, "sink": 2, "full_layers": "3", "full_heads": "0.1,1.0", "init": "teacher", "gate": "headwise"}


def split_student(family: str, **extra):
    return perturbed(edit_model(tiny_teacher(family), "gateswa", {**SPLIT, **extra}))


@pytest.mark.parametrize("full", [(0,), (1,), (0, 2), (1, 3)])
def test_each_query_head_sees_what_its_kv_head_is_allowed(full):
    """Against plain softmax attention with a per-head mask: query head h reads KV head h // group, causal for
    the full KV heads, window + sinks for the others."""
    heads, kv_heads, t, d, window, sink = 8, 4, 13, 8, 4, 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, t, d, generator=g) for n in (heads, kv_heads, kv_heads))
    attn = type("Attn", (), {"head_split": HeadSplit.make(full, heads, kv_heads), "window": window, "sink": sink, "layer_idx": 0})
    ctx = AttentionContext(torch.arange(t)[None].expand(2, t), 0, t, None, None)
    out = split_attention(attn, q, k, v, ctx, 0.5)
    idx = torch.arange(t)
    kv_of = torch.arange(heads) // (heads // kv_heads)
    mask = torch.stack([window_mask(idx, idx, None if int(kv_of[h]) in full else window, sink) for h in range(heads)])
    scores = (q @ k[:, kv_of].transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v[:, kv_of])


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(family):
    """Chunked prefill then single tokens, through a growing and through a static cache, equals one forward pass;
    and the split layers compute something else than all-sliding or all-full layers would."""
    student = split_student(family)
    assert [x.get("full_kv_heads") for x in student.config.layer_attention] == [[1], [0], None, None]
    ids = tiny_ids(length=21)  # longer than window + sinks
    full = student(ids).logits
    grown, cache = incremental_logits(student, ids)
    torch.testing.assert_close(grown, full, atol=1e-5, rtol=1e-4)
    assert isinstance(cache.layers[0], SplitHeadsCacheLayer) and not cache.layers[0].static
    stat, cache = static_logits(student, ids)
    torch.testing.assert_close(stat, full, atol=1e-5, rtol=1e-4)
    assert cache.is_compileable and cache.layers[1].static
    for other in ({"full_heads": "none"}, {"full_heads": "none", "full_layers": "0,1,3"}):
        changed = split_student(family, **other)
        assert (changed(ids).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_cached_decoding_with_left_padding(static):
    student = split_student("qwen2", sink=0)
    ids = tiny_ids(length=19)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    full = student(ids, attention_mask=mask).logits
    run = static_logits if static else incremental_logits
    inc, _ = run(student, ids, mask, pieces=(9,))
    torch.testing.assert_close(inc[0, 4:], full[0, 4:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inc[1], full[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full[0, 4:], student(ids[:1, 4:]).logits[0], atol=1e-5, rtol=1e-4)  # padding changes nothing


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@torch.no_grad()
def test_chunked_prefill_equals_one_piece(static):
    """A prefill in chunks of the cache's rows (static: each group's caches are row views) and of the sequence."""
    from test_prefill_chunks import _prefill_then_decode

    student = split_student("mistral")
    ids = tiny_ids(batch=3, length=23)
    whole, _ = _prefill_then_decode(student, ids, None, static, chunk=None)
    chunked, cache = _prefill_then_decode(student, ids, None, static, chunk=10)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 26


def test_decode_step_traces_into_one_graph_without_retracing():
    """fullgraph=True fails on any graph break; the frame counter catches a re-trace per step."""
    from torch._dynamo.testing import CompileCounter

    student = split_student("qwen3")
    ids = tiny_ids(length=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # padding on, so the padded decode path is traced too
    outs = {}
    with torch.no_grad():
        for compiled in (False, True):
            cache = student.new_cache(static=True, batch_size=2, max_length=20)
            student(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            counter = CompileCounter()
            torch._dynamo.reset()
            step = torch.compile(student, backend=counter, fullgraph=True) if compiled else student
            token, outs[compiled] = ids[:, -1:].clone(memory_format=torch.contiguous_format), []
            for _ in range(5):
                out = step(input_ids=token, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
                outs[compiled].append(out.logits)
    assert counter.frame_count == 1 and cache.get_seq_length() == 14
    torch.testing.assert_close(torch.cat(outs[True]), torch.cat(outs[False]))


@torch.no_grad()
def test_generate_static_equals_dynamic_and_beam_search_runs():
    student = split_student("llama")
    ids = tiny_ids(length=9)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    static = student.generate(ids, **kw)
    dynamic = student.generate(ids, cache_implementation="dynamic", **kw)
    assert torch.equal(static, dynamic) and static.shape[1] == 21
    assert student.generate(ids, num_beams=2, **kw).shape[1] == 21  # reorders the split cache


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("context,chunk", [(4, None), (29, None), (29, 5), (29, 1)])
def test_allocated_cache_bytes_equal_analytic(family, context, chunk):
    student = edit_model(tiny_teacher(family), "gateswa", SPLIT)
    measured = measured_cache_bytes(student, context, batch=3, chunk=chunk)
    assert measured == kv_summary(student.config, context, dtype="float32")["kv_bytes_total"] * 3


def test_static_cache_bytes_equal_analytic():
    student = edit_model(tiny_teacher("qwen3_moe"), "gateswa", SPLIT)
    cache = student.new_cache(static=True, batch_size=3, max_length=29)
    assert cache.allocated_bytes() == kv_summary(student.config, 29, dtype="float32")["kv_bytes_total"] * 3


@pytest.mark.parametrize("family", MORE_FAMILY_NAMES)
@torch.no_grad()
def test_teacher_layer_families_decode_split_layers_and_hold_their_bytes(family):
    """The families whose own decoder layer calls the attention (score scales, soft-capping, per-layer RoPE, QK-norm
    over the projection, multipliers): split layers where the teacher attends fully start as the teacher with a window
    wider than the text, decode through growing and static caches as the full forward does, compute something else
    than the layer sliding whole, and their caches hold the per-head bytes."""
    ids = tiny_ids(length=21)
    teacher = perturbed(tiny_teacher(family), 0.2)  # scores large enough for Gemma 2's soft-capping to show
    wide = {"init": "teacher", "window": 64, "sink": 0, "gate": "none", "full_layers": "none", "full_heads": "1.0,3.1"}
    exact = edit_model(teacher, "gateswa", wide)
    assert [x.get("full_kv_heads") for x in exact.config.layer_attention] == [None, [0], None, [1]]
    torch.testing.assert_close(exact(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-4)
    args = {"window": 5, "sink": 1, "full_layers": "3", "full_heads": "1.0", "init": "teacher", "gate": "headwise"}
    student = split_student(family, **args)
    assert student.config.layer_attention[1]["full_kv_heads"] == [0]
    full = check_decoding_and_bytes(student, ids)
    assert (split_student(family, **{**args, "full_heads": "none"})(ids).logits - full).abs().max() > 1e-3


def test_layers_where_the_teacher_slides_keep_no_full_heads():
    """Gemma 2 slides in layers 0 and 2 (6 tokens): naming one of their heads is a one-line error, and an auto choice
    picks among the heads of layers 1 and 3 only, its budget counting the teacher's windows where they stay."""
    teacher = tiny_teacher("gemma2")
    with pytest.raises(AttnEditError, match=r"layer 2, where the teacher itself slides \(6 tokens\)") as e:
        edited_config(teacher.config, "gateswa", {"window": 8, "full_layers": "none", "full_heads": "2.0"})
    assert "\n" not in str(e.value)
    args = {"window": 8, "sink": 0, "full_layers": "none"}
    for choice, count in (("auto:1", 1), ("auto:3", 3), ("auto@0.613:64", 2)):
        layers = edited_config(teacher.config, "gateswa", {**args, "full_heads": choice}).layer_attention
        assert [(x["layer_type"], x["window"], x.get("full_kv_heads")) for x in layers[0::2]] == [("sliding", 6, None)] * 2
        assert sum(2 if x["layer_type"] == "full" else len(x.get("full_kv_heads") or []) for x in layers) == count
    # at 64 tokens, in full layers' worth: the teacher caches 2 + 2 x 6/64 = 2.1875; with no head full the edit caches
    # 2 x 6/64 + 2 x 8/64 = 0.4375 and each full head adds (1 - 8/64) / 2 = 0.4375, so 0.613 of the teacher's holds two
    # heads (one, were the teacher's sliding layers counted at GateSWA's window of 8)
    budget = edited_config(teacher.config, "gateswa", {**args, "full_heads": "auto@0.613:64"})
    assert [x.get("full_kv_heads") for x in budget.layer_attention] == [None, [1], None, [1]]
    fraction = kv_summary(budget, 64)["kv_bytes_per_token"] / kv_summary(teacher.config, 64)["kv_bytes_per_token"]
    assert fraction == pytest.approx(0.4375 * 3 / 2.1875) and fraction <= 0.613


def test_the_model_card_says_which_layers_keep_heads_full():
    from attnedit.export.card import model_card

    card = model_card(edit_model(tiny_teacher("llama"), "gateswa", {"window": 5, "full_layers": "3", "full_heads": "1.0"}).config)
    assert "per layer (layer_type, full_kv_heads vary: `layer_attention` in config.json)" in card
    assert "`full_heads=1.0`" in card


def test_kv_figures_follow_the_per_head_formula():
    """2 KV heads x head_dim 16: a layer with one head full caches 2 x 16 x (1 + 1 x min(window + sink, L) / L)."""
    student = edit_model(tiny_teacher("llama"), "gateswa", {"window": 10, "sink": 2, "full_layers": "3", "full_heads": "0.1"})
    layers = kv_summary(student.config, 100)["layers"]
    assert [x["kind"] for x in layers] == ["gateswa-heads", "gateswa-sliding", "gateswa-sliding", "gateswa-full"]
    assert layers[0]["values_per_token"] == pytest.approx(2 * 16 * (1 + 12 / 100))
    assert layers[1]["values_per_token"] == pytest.approx(2 * 2 * 16 * 12 / 100)


@pytest.mark.parametrize(
    "args,message",
    [
        ({"full_heads": "0.2"}, r"full_heads: 0\.2 does not exist; the model has layers 0-3 with KV heads 0-1"),
        ({"full_heads": "0-1"}, r"cannot read '0-1'; use LAYER\.HEAD pairs"),
        ({"full_heads": "0.0,0.1"}, r"every KV head of layer 0 full: list the layer in full_layers"),
        ({"full_heads": "3.0", "full_layers": "3"}, r"layer 3, which full_layers already keeps full"),
        ({"full_heads": "3.0", "layers": "0-2"}, r"layer 3, which is not edited"),
        ({"full_heads": "auto:2", "full_layers": "auto:1"}, r"both auto: choose one"),
        ({"full_heads": "0.1", "full_layers": "auto@0.5:64"}, r"chooses whole layers: set full_heads=none"),
        ({"full_heads": "auto@0.01:64"}, r"already caches .* of the teacher's KV at 64 tokens; raise the budget"),
        ({"full_heads": "auto@1.5:64"}, r"budget F must be in \(0, 1\]"),
        ({"full_heads": "auto@0.5"}, r"write auto:K .* or auto@F:L"),
        ({"auto_score": "nll"}, r"auto_score='nll': choose kl or recall"),
    ],
)
def test_bad_head_settings_are_one_line_errors(args, message):
    with pytest.raises(AttnEditError, match=message) as e:
        edit_model(tiny_teacher("llama"), "gateswa", {"window": 8, "full_layers": "none", **args})
    assert "\n" not in str(e.value)


def test_edit_refuses_an_unmeasured_auto_choice_of_heads():
    with pytest.raises(AttnEditError, match="full_heads=auto:2 is measured on training data"):
        edit_model(tiny_teacher("llama"), "gateswa", {"full_heads": "auto:2", "full_layers": "none"})


@pytest.mark.parametrize("family,fmt", [("llama", "ministral"), ("mistral", "qwen2"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                        ("qwen3_moe", "qwen3_moe")])  # fmt: skip
def test_stock_exports_refuse_per_head_windows_in_one_line(tmp_path, family, fmt):
    student = edit_model(tiny_teacher(family), "gateswa", {"window": 8, "sink": 0, "gate": "none", "full_layers": "none", "full_heads": "2.1"})
    with pytest.raises(AttnEditError, match=rf"keeps some KV heads full inside sliding layers \(2\) .*{fmt} included.*--format hf") as e:
        export_stock_swa(student, tmp_path / "x", fmt=fmt)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_the_remote_code_export_reproduces_it_with_the_designed_cache(tmp_path, capsys):
    student = split_student("qwen3")
    out = save_edited(student, tmp_path / "hf")
    assert (out / "split_heads.py").is_file()
    report = check_export(student, out, context=24, remote_code=True)
    assert report.ok, report.summary()
    assert [x.kind for x in report.layers] == ["heads", "heads", "sliding", "full"]
    assert main(["export", str(out), "--format", "stock", "--out", str(tmp_path / "stock")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the save's progress bars: the one-line error
    assert last.startswith("attnedit: error: this GateSWA model keeps some KV heads full") and "--format hf" in last
    assert not (tmp_path / "stock").exists()
