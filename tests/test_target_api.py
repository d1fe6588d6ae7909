"""The target API from the outside: a toy target (tests/toy_target.py, tests/toy_attention.py) registered
through attnedit.surgery.register_target converts a tiny teacher with `attnedit convert` (both stages, the
evaluation, passkey, bench, report), and its checkpoint loads through transformers alone."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml
from test_convert_eval import EVAL, wikitext
from test_stages import make_docs, make_teacher_dir, tiny_raw
from test_targets import incremental_logits
from tiny import tiny_ids, tiny_teacher
from toy_target import TiedKVTarget

from attnedit.cli import main
from attnedit.errors import AttnEditError
from attnedit.eval.kv import analytic_cache_bytes, kv_summary, measured_cache_bytes
from attnedit.surgery import TARGETS, Target, api, edit_model, get_target, register_target, unregister_target
from attnedit.targets import ATTENTION_CLASSES, MLAAttention


@pytest.fixture
def toy():
    target = register_target(TiedKVTarget())
    yield target
    unregister_target(target.name)


@torch.no_grad()
def test_a_registered_target_edits_decodes_and_caches_its_analytic_bytes(toy):
    assert "tiedkv" in TARGETS and ATTENTION_CLASSES["tiedkv"] is toy.attention
    teacher = tiny_teacher("qwen2")
    student = edit_model(teacher, "tiedkv", {"init": "teacher", "layers": "1-3"})
    ids = tiny_ids(length=21)
    full = student(ids).logits
    torch.testing.assert_close(incremental_logits(student, ids)[0], full, atol=1e-5, rtol=1e-4)
    static = student.new_cache(static=True, batch_size=2, max_length=24)
    torch.testing.assert_close(incremental_logits(student, ids, cache=static)[0], full, atol=1e-5, rtol=1e-4)
    layers = kv_summary(student.config, 64)["layers"]
    assert [x["kind"] for x in layers] == ["dense", "tiedkv", "tiedkv", "tiedkv"] and layers[1]["values_per_token"] == 2 * 16
    assert measured_cache_bytes(student, 29, batch=3, chunk=5) == analytic_cache_bytes(student.config, 29, 3, "float32")
    assert student.config.attention_code == {"tiedkv": "toy_attention.TiedKVAttention"}


def test_a_registered_target_converts_a_tiny_teacher_end_to_end(toy, tmp_path, capsys):
    """`attnedit convert` with `target: tiedkv`: both stages, the held-out figures, eval.json, passkey.json,
    bench.json, report.md and the model card; `inspect` reads the model; the checkpoint carries the toy's file
    and loads through transformers' remote code with the target no longer registered."""
    from attnedit.teachers import load_model

    raw = tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), target="tiedkv",
                   target_args={"init": "teacher"}, stage1__steps=2, stage2__steps=2)  # fmt: skip
    raw["eval"] = {**EVAL, "data_dir": str(wikitext(tmp_path))}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["convert", str(tmp_path / "recipe.yaml"), "--out", str(run), "--progress", "none"]) == 0
    for name in ("eval.json", "passkey.json", "bench.json", "report.md", "model/README.md", "model/toy_attention.py"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage1"]["steps"] == 2 and summary["heldout_after"]["kl"] >= 0
    assert summary["kv"]["ratio"][0] == pytest.approx(0.5)  # one cached vector per KV head instead of two
    assert "attention converted to tiedkv" in (run / "model" / "README.md").read_text()
    assert main(["inspect", str(run / "model"), "--context", "64"]) == 0
    assert "tiedkv" in capsys.readouterr().out
    unregister_target("tiedkv")
    assert "tiedkv" not in ATTENTION_CLASSES
    model, _ = load_model(str(run / "model"))  # the class comes from the checkpoint's own toy_attention.py
    module = type(model.model.layers[0].self_attn).__module__
    assert module.startswith("transformers_modules.") and module.endswith(".toy_attention")
    assert model.config.edit["target"] == "tiedkv"
    with torch.no_grad():
        assert torch.isfinite(model(tiny_ids(length=9)).logits).all()


def test_registry_refusals_are_one_line(toy):
    class Clash(Target):
        name, settings, attention = "clash", toy.settings, MLAAttention

        def plan_layer(self, settings, layer):
            return {}

        def cache_values(self, layer, spec, context):
            return 0.0

    with pytest.raises(AttnEditError, match="layer kind 'mla' belongs to mla"):
        register_target(Clash())
    with pytest.raises(AttnEditError, match="registered already"):
        register_target(TiedKVTarget())
    with pytest.raises(AttnEditError, match="unknown target 'nope'; choose one of: mla, gateswa, gqa, tiedkv"):
        get_target("nope")
    with pytest.raises(AttnEditError, match="kv_heads=3: must divide"):
        edit_model(tiny_teacher("llama"), "tiedkv", {"kv_heads": 3})
    with pytest.raises(AttnEditError, match="no initialisation from the teacher"):
        Target().init_from_teacher(None, None, {}, {}, None, None)


def test_installed_packages_register_targets_through_entry_points(monkeypatch):
    """Each `attnedit.targets` entry point is imported before any target is looked up; a broken one is named."""
    loaded = []

    class EntryPoint:
        name, value = "toy", "toy_target:register"

        def load(self):
            loaded.append(self.name)
            register_target(TiedKVTarget())

    monkeypatch.setattr(api, "_LOADED", False)
    monkeypatch.setattr(api, "_REGISTRY", {})
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [EntryPoint()] if group == "attnedit.targets" else [])
    try:
        assert list(TARGETS) == ["mla", "gateswa", "gqa", "tiedkv"] and loaded == ["toy"]
    finally:
        ATTENTION_CLASSES.pop("tiedkv", None)

    class Broken(EntryPoint):
        def load(self):
            raise ImportError("no module named toy")

    monkeypatch.setattr(api, "_LOADED", False)
    monkeypatch.setattr(api, "_REGISTRY", {})
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Broken()])
    with pytest.raises(AttnEditError, match="entry point 'toy' .* failed to load: no module named toy"):
        get_target("mla")
