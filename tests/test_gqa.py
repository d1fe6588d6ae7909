"""GQA head reduction: the third built-in target. Its start from the teacher (aligned, then averaged heads), its
cache, and its export as the teacher's own stock architecture with fewer KV heads."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_ids, tiny_teacher
from transformers import AutoModelForCausalLM

from attnedit.errors import AttnEditError
from attnedit.eval.kv import analytic_cache_bytes, kv_summary, measured_cache_bytes
from attnedit.export.check import check_export
from attnedit.export.stock import export_teacher_format
from attnedit.surgery import edit_model
from attnedit.surgery.gqa import default_kv_heads, rotate_rows

CALIB = tiny_ids(batch=4, length=32, seed=7)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_gqa_with_the_teachers_head_count_is_the_teacher(family):
    teacher = tiny_teacher(family)
    student = edit_model(teacher, "gqa", {"init": "teacher", "num_key_value_heads": 2}, calibration_ids=CALIB)
    ids = tiny_ids(length=20)
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-4)


def _mergeable_teacher(family: str):
    """A teacher whose second KV head is the first one seen through maps the layer absorbs: its keys rotated
    pair by pair (commutes with RoPE), its values through an orthogonal map; queries and o_proj untouched. So
    its heads merge without loss, once aligned."""
    teacher = tiny_teacher(family)
    g = torch.Generator().manual_seed(5)
    d = 16
    with torch.no_grad():
        for layer in teacher.model.layers:
            attn = layer.self_attn
            angles = torch.rand(d // 2, generator=g) * 6.0
            q_map, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
            wk, wv = attn.k_proj.weight.view(2, d, -1), attn.v_proj.weight.view(2, d, -1)
            wk[1] = rotate_rows(wk[0], angles.cos(), angles.sin())
            wv[1] = q_map @ wv[0]
            if attn.k_proj.bias is not None:
                bk, bv = attn.k_proj.bias.view(2, d), attn.v_proj.bias.view(2, d)
                bk[1] = rotate_rows(bk[0], angles.cos(), angles.sin())
                bv[1] = q_map @ bv[0]
    return teacher


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_aligned_merge_recovers_heads_that_differ_by_absorbable_maps(family):
    teacher = _mergeable_teacher(family)
    ids = tiny_ids(length=20)
    want = teacher(ids).logits
    aligned = edit_model(teacher, "gqa", {"init": "teacher", "num_key_value_heads": 1}, calibration_ids=CALIB)
    torch.testing.assert_close(aligned(ids).logits, want, atol=1e-4, rtol=1e-4)
    plain = edit_model(teacher, "gqa", {"init": "teacher", "num_key_value_heads": 1, "align": False}, calibration_ids=CALIB)
    assert (plain(ids).logits - want).abs().max() > 100 * (aligned(ids).logits - want).abs().max()


@torch.no_grad()
def test_alignment_lowers_the_merge_error_on_a_real_teacher_layer():
    """On heads that are not exact rotations of each other (random weights), aligning still brings the merged
    layer closer to the teacher's than plain averaging."""
    from attnedit.surgery import capture_attention_inputs
    from attnedit.targets import AttentionContext

    teacher = tiny_teacher("llama")
    x = capture_attention_inputs(teacher, [1], CALIB)[1].view(4, 32, -1)
    pos = torch.arange(32)[None].expand(4, 32)
    y = teacher.model.layers[1].self_attn(hidden_states=x, position_embeddings=teacher.model.rotary_emb(x, pos), attention_mask=None)[0]
    errors = {}
    for align in (True, False):
        student = edit_model(teacher, "gqa", {"init": "teacher", "num_key_value_heads": 1, "align": align}, calibration_ids=CALIB)
        out = student.model.layers[1].self_attn(x, AttentionContext(pos, 0, 32, None, None))
        errors[align] = ((out - y).norm() / y.norm()).item()
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gqa_cache_holds_its_analytic_bytes(family):
    student = edit_model(tiny_teacher(family), "gqa", {"num_key_value_heads": 1})
    layers = kv_summary(student.config, 100)["layers"]
    assert {x["kind"] for x in layers} == {"gqa"} and {x["values_per_token"] for x in layers} == {2 * 1 * 16}
    assert measured_cache_bytes(student, 29, batch=3, chunk=5) == analytic_cache_bytes(student.config, 29, 3, "float32")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_stock_export_loads_in_stock_transformers_with_equal_float32_logits(tmp_path, family):
    teacher = tiny_teacher(family)
    student = edit_model(teacher, "gqa", {"init": "teacher", "num_key_value_heads": 1}, calibration_ids=CALIB)
    with torch.no_grad():  # trained weights: the export must carry every one of them
        for p in student.attentions()[2].parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_teacher_format(student, tmp_path / "stock")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == teacher.config.model_type and config["num_key_value_heads"] == 1 and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(stock) is type(teacher)
    ids = tiny_ids(length=19)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
    report = check_export(student, out, new_tokens=6)
    assert report.ok and report.stock_bytes == report.designed_bytes == report.teacher_bytes // 2, report.summary()


def test_default_head_count_is_a_third_of_the_teachers():
    assert [default_kv_heads(n) for n in (9, 8, 32, 4, 2, 1)] == [3, 2, 8, 1, 1, 1]


@pytest.mark.parametrize(
    "args,export,message",
    [
        ({"num_key_value_heads": 3}, False, "must divide the teacher's 2 KV heads"),
        ({"num_key_value_heads": 4}, False, "must divide"),
        ({"num_key_value_heads": 1, "layers": "1-3"}, True, "one num_key_value_heads for every layer"),
    ],
)
def test_gqa_refusals_are_one_line(tmp_path, args, export, message):
    with pytest.raises(AttnEditError, match=message) as e:
        student = edit_model(tiny_teacher("llama"), "gqa", args)
        if export:
            export_teacher_format(student, tmp_path / "x")
    assert "\n" not in str(e.value)


def test_export_cli_writes_the_teacher_format_for_gqa(tmp_path, capsys):
    from attnedit.cli import main
    from attnedit.export import save_edited

    src = save_edited(edit_model(tiny_teacher("qwen3"), "gqa", {"num_key_value_heads": 1}), tmp_path / "m")
    assert main(["export", str(src), "--format", "stock", "--out", str(tmp_path / "stock")]) == 0
    out = capsys.readouterr().out
    assert "format teacher, stock: no remote code" in out and "PASS" in out
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == "qwen3"
