"""full_layers: auto:K - per-layer window sensitivity, measured on the teacher itself."""

import pytest
import torch
from tiny import tiny_ids, tiny_teacher

from attnedit.errors import AttnEditError
from attnedit.surgery.sensitivity import choose_full_layers, parse_auto, window_sensitivity


def test_parse_auto():
    assert parse_auto("auto:3") == 3 and parse_auto("every:6") is None and parse_auto("1,2") is None
    with pytest.raises(AttnEditError, match="auto:K"):
        parse_auto("auto:x")


def test_choose_full_layers_takes_the_largest_in_layer_order():
    assert choose_full_layers([0.1, 0.5, 0.0, 0.5, 0.2], 3) == [1, 3, 4]
    with pytest.raises(AttnEditError, match="only 5 layers"):
        choose_full_layers([0.0] * 5, 6)


def test_window_sensitivity_finds_the_layer_that_needs_distant_tokens():
    """Make one layer's attention depend on distant tokens much more than the others': scaling its value and
    output projections up makes windowing it cost most; a window covering the text costs nothing."""
    teacher = tiny_teacher("llama")
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.mul_(8.0)
    ids = tiny_ids(batch=3, length=40)
    scores = window_sensitivity(teacher, ids, window=4, sink=1)
    assert len(scores) == 4 and all(s >= 0 for s in scores)
    assert max(range(4), key=lambda i: scores[i]) == 2, scores
    with pytest.raises(AttnEditError, match="not longer than window"):
        window_sensitivity(teacher, ids, window=40, sink=0)
    wide = window_sensitivity(teacher, ids, window=24, sink=1)  # a wider window cuts less
    assert wide[2] < scores[2]


def test_window_sensitivity_is_the_same_in_row_batches_and_kl_pieces(monkeypatch):
    """Memory is bounded by batching rows by tokens and taking the KL in pieces; the scores do not change."""
    from attnedit.surgery import sensitivity

    teacher = tiny_teacher("qwen3")
    ids = tiny_ids(batch=3, length=40)
    whole = window_sensitivity(teacher, ids, window=4, sink=1)  # 3 rows of 40 tokens in one batch
    monkeypatch.setattr(sensitivity, "KL_CHUNK", 6)  # 35 positions: pieces of 6 and a last one of 5
    pieces = window_sensitivity(teacher, ids, window=4, sink=1, batch_tokens=80)  # 2 rows, then the last one
    assert torch.allclose(torch.tensor(pieces), torch.tensor(whole), rtol=1e-4, atol=1e-7), (pieces, whole)
    assert max(whole) > 0


def test_convert_measures_auto_full_layers_and_reuses_the_choice_on_resume(tmp_path, monkeypatch):
    import json

    from test_stages import make_docs, make_teacher_dir, tiny_raw

    from attnedit.recipe import parse_recipe
    from attnedit.stages import convert
    from attnedit.surgery import sensitivity

    raw = tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), target="gateswa",
                   stage1__steps=2, stage2__steps=0, checkpoint_every=1)  # fmt: skip
    raw["target_args"] = {"window": 8, "sink": 1, "full_layers": "auto:2"}
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    record = json.loads((tmp_path / "run" / "full_layers.json").read_text())
    assert record["auto"] == 2 and len(record["scores_kl"]) == 4
    assert record["chosen"] == choose_full_layers(record["scores_kl"], 2) == summary["full_layers"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert [i for i, x in enumerate(config["layer_attention"]) if x["layer_type"] == "full"] == record["chosen"]
    # a resumed run takes the recorded choice and measures nothing again
    monkeypatch.setattr(sensitivity, "window_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    (tmp_path / "run" / "summary.json").unlink()
    convert(parse_recipe(raw), tmp_path / "run", resume=True, progress="none")


def test_edit_refuses_unmeasured_auto_full_layers():
    from attnedit.surgery import edit_model

    with pytest.raises(AttnEditError, match="measured on training data"):
        edit_model(tiny_teacher("llama"), "gateswa", {"full_layers": "auto:1"})


def test_auto_zero_and_auto_all_resolve_without_leaving_auto():
    """auto:0 keeps no layer full (nothing to measure); auto:n keeps every layer full."""
    from attnedit.surgery import edit_model
    from attnedit.surgery.sensitivity import resolve_auto_full_layers

    teacher = tiny_teacher("llama")
    ids = tiny_ids(batch=2, length=20)
    none, record = resolve_auto_full_layers(teacher, {"window": 4, "full_layers": "auto:0"}, lambda: pytest.fail("measured"))
    assert none["full_layers"] == "none" and record is None
    every, record = resolve_auto_full_layers(teacher, {"window": 4, "sink": 1, "full_layers": "auto:4"}, lambda: ids)
    assert every["full_layers"] == "0,1,2,3" and record["chosen"] == [0, 1, 2, 3]
    again, _ = resolve_auto_full_layers(teacher, {"window": 4, "full_layers": "auto:4"}, lambda: pytest.fail("measured"), record)
    assert again["full_layers"] == "0,1,2,3"  # a recorded choice is applied without measuring
    for args in (none, every):
        edit_model(teacher, "gateswa", args)  # explicit layers: accepted
