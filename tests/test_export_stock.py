"""Stock exports of both targets load without remote code and reproduce the attnedit model exactly.

GateSWA with ``gate=none, sink=0`` -> ministral / qwen2 / qwen3 / qwen3_moe with ``layer_types``;
MLA -> deepseek_v3. Every export goes through :func:`check_export`: float32 logits, a 32-token greedy
generation, and the stock cache's bytes against the design, with prompts longer than the window.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILY_NAMES, perturbed, tiny_ids, tiny_teacher
from transformers import AutoModelForCausalLM

from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.export import save_edited
from attnedit.export.check import check_export
from attnedit.export.deepseek import export_deepseek_v3
from attnedit.export.stock import DEFAULT_SWA_FORMAT, export_stock_swa
from attnedit.surgery import edit_model

WINDOW = 8
STOCK_SWA = {"gate": "none", "sink": 0, "window": WINDOW, "full_layers": "1"}


def _stock_student(family, **extra):
    args = dict(STOCK_SWA, init="teacher", **extra)
    if family == "qwen3_moe":
        args["full_layers"] = "none"  # stock qwen3_moe has one window for every layer
    return perturbed(edit_model(tiny_teacher(family), "gateswa", args))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gateswa_stock_export_matches_stock_loader(tmp_path, family):
    student = _stock_student(family)
    assert not [n for n, _ in student.named_parameters() if "g_proj" in n]
    out = export_stock_swa(student, tmp_path / "swa")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == DEFAULT_SWA_FORMAT[family] and "auto_map" not in cfg
    assert not list(out.glob("*.py")), "a stock export carries no remote code"
    assert cfg["sliding_window"] == WINDOW
    if family == "qwen3_moe":
        assert cfg["use_sliding_window"] and "layer_types" not in cfg
    else:
        assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    if family in ("qwen2", "qwen3"):
        assert cfg["use_sliding_window"] and cfg["max_window_layers"] == 4
    report = check_export(student, out, context=3 * WINDOW)
    assert report.max_abs_logit_diff < 1e-5 and report.max_abs_logit > 0.5, report.summary()
    assert report.greedy_match, report.summary()
    assert report.cache_ok and report.ok, report.summary()
    for layer in report.layers:  # ring-limited sliding layers, full layers keep every token
        if layer.kind == "sliding":
            assert layer.tokens == WINDOW and layer.visible == WINDOW - 1
        else:
            assert layer.tokens == layer.visible == report.cache_tokens == 3 * WINDOW + 31
    n_sliding = sum(x.kind == "sliding" for x in report.layers)
    assert report.stock_bytes < report.teacher_bytes and n_sliding == (4 if family == "qwen3_moe" else 3)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "qwen3_moe"])
def test_mla_deepseek_export_parity_and_latent_cache(tmp_path, family):
    student = perturbed(edit_model(tiny_teacher(family), "mla", {"init": "teacher", "bias": "false"}))  # stock DeepSeek-V3 holds no biases
    out = export_deepseek_v3(student, tmp_path / "ds")
    report = check_export(student, out)
    assert report.stock_class == "DeepseekV3ForCausalLM" and not report.remote_code
    assert report.max_abs_logit_diff < 1e-4 and report.greedy_match, report.summary()
    layer = student.config.layer_attention[0]
    latent = report.cache_tokens * (layer["kv_lora_rank"] + layer["qk_rope_head_dim"]) * 4
    assert all(x.kind == "mla" and x.stock_bytes == latent for x in report.layers), report.summary()


def test_llama_to_qwen2_adds_zero_biases(tmp_path):
    student = _stock_student("llama")
    out = export_stock_swa(student, tmp_path / "q2", fmt="qwen2")
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert type(stock).__name__ == "Qwen2ForCausalLM" and stock.config.tie_word_embeddings
    assert torch.count_nonzero(stock.model.layers[0].self_attn.q_proj.bias) == 0
    assert check_export(student, out, context=3 * WINDOW).ok


@pytest.mark.parametrize("window", [WINDOW - 1, WINDOW + 1])
def test_parity_catches_a_window_off_by_one(tmp_path, window):
    """If the stock window were one token off, the check (prompt longer than the window) would fail."""
    student = _stock_student("llama")
    out = export_stock_swa(student, tmp_path / "swa")
    cfg = json.loads((out / "config.json").read_text())
    cfg["sliding_window"] = window
    (out / "config.json").write_text(json.dumps(cfg))
    report = check_export(student, out, context=3 * WINDOW)
    assert report.max_abs_logit_diff > 1e-3 and not report.ok


def test_hf_export_check_with_remote_code(tmp_path):
    student = _stock_student("qwen3")
    out = save_edited(student, tmp_path / "hf")
    report = check_export(student, out, context=3 * WINDOW, remote_code=True)
    assert report.ok, report.summary()


@pytest.mark.parametrize(
    "family,target,args,fmt,message",
    [
        ("llama", "gateswa", {"sink": 0}, "ministral", r"gate=elementwise \(.*gate must be none"),
        ("qwen2", "gateswa", {"gate": "none"}, "qwen2", r"sink=4 \(.*sink must be 0"),
        ("qwen3", "gateswa", {}, "qwen3", r"gate=elementwise .* and sink=4 .*--set gate=none --set sink=0"),
        ("llama", "gateswa", {}, "deepseek_v3", r"GateSWA, not MLA.*--format hf.*--format ministral or qwen2"),
        ("qwen3", "gateswa", {"gate": "none", "sink": 0}, "deepseek_v3", r"GateSWA.*--format qwen3"),
        ("llama", "mla", {}, "ministral", r"this model is MLA.*--format deepseek_v3"),
        ("qwen3", "gateswa", {"gate": "none", "sink": 0}, "ministral", r"qwen3 model cannot be written as stock ministral; its formats: qwen3, hf"),
        ("qwen2", "gateswa", {"gate": "none", "sink": 0}, "ministral", r"qwen2 model cannot be written as stock ministral; its formats: qwen2, hf"),
        ("qwen3_moe", "gateswa", {"gate": "none", "sink": 0, "full_layers": "1"}, "qwen3_moe", r"one sliding_window for every layer.*full_layers=none"),
        ("llama", "gateswa", {"gate": "none", "sink": 0, "layers": "0-1"}, "ministral", None),
    ],
)
def test_exports_say_what_prevents_them(tmp_path, family, target, args, fmt, message):
    student = edit_model(tiny_teacher(family), target, dict(args, window=WINDOW) if target == "gateswa" else args)
    write = export_deepseek_v3 if fmt == "deepseek_v3" else lambda m, o: export_stock_swa(m, o, fmt=fmt)
    if message is None:  # unedited layers are the teacher's full attention: still exportable
        out = write(student, tmp_path / "x")
        assert json.loads((out / "config.json").read_text())["layer_types"][2:] == ["full_attention"] * 2
        assert check_export(student, out, context=3 * WINDOW).ok
        return
    with pytest.raises(AttnEditError, match=message):
        write(student, tmp_path / "x")


def test_export_cli_stock_with_check(tmp_path, capsys):
    teacher = tiny_teacher("mistral")
    teacher.save_pretrained(tmp_path / "teacher")
    assert (
        main(
            [
                "edit",
                str(tmp_path / "teacher"),
                "--target",
                "gateswa",
                "--set",
                "gate=none",
                "--set",
                "sink=0",
                "--set",
                f"window={WINDOW}",
                "--set",
                "init=teacher",
                "--out",
                str(tmp_path / "gs"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(tmp_path / "gs"), "--format", "stock", "--out", str(tmp_path / "ex"), "--check-context", "40"]) == 0
    text = capsys.readouterr().out
    assert "format ministral" in text and "greedy 32 tokens: identical" in text and "result: PASS" in text
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ex", trust_remote_code=False)
    ids = tiny_ids(length=WINDOW)  # within the window, init=teacher with no gate is the teacher itself
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, teacher(ids).logits)
    assert main(["export", str(tmp_path / "gs"), "--format", "deepseek_v3", "--out", str(tmp_path / "ds")]) != 0
    assert "GateSWA, not MLA" in capsys.readouterr().err
