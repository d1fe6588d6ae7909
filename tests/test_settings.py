"""Settings: defaults from the teacher's shapes, and one-line errors for impossible requests."""

from __future__ import annotations

import pytest
from tiny import tiny_teacher
from transformers import GPT2Config

from attnedit.errors import AttnEditError
from attnedit.families import family_for
from attnedit.surgery import edited_config
from attnedit.surgery.settings import parse_layer_list


def test_mla_defaults_follow_teacher_shapes():
    cfg = edited_config(tiny_teacher("llama").config, "mla")
    layer = cfg.layer_attention[0]
    # head_dim 16, 2 KV heads: rope = 8, nope = 8, v = 16, rank = a quarter of K+V width (64) rounded to 16
    assert (layer["qk_rope_head_dim"], layer["qk_nope_head_dim"], layer["v_head_dim"]) == (8, 8, 16)
    assert layer["kv_lora_rank"] == 16 and layer["q_lora_rank"] is None


def test_layer_patterns():
    assert parse_layer_list("all", 4) == [0, 1, 2, 3]
    assert parse_layer_list("every:2", 6) == [1, 3, 5]
    assert parse_layer_list("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_layer_list([3, 1], 6) == [1, 3]
    assert parse_layer_list("none", 6) == []


@pytest.mark.parametrize(
    "target,args,message",
    [
        ("mla", {"kv_lora_rank": 10_000}, "kv_lora_rank=10000: must be between 1 and"),
        ("mla", {"kv_lora_rank": 0}, "kv_lora_rank=0"),
        ("mla", {"qk_rope_head_dim": 3}, "must be an even number"),
        ("mla", {"init": "teacher", "qk_nope_head_dim": 4}, "init=teacher for MLA needs"),
        ("mla", {"kv_lora_rank": "many"}, "is not a valid int"),
        ("mla", {"colour": "blue"}, "mla has no setting 'colour'"),
        ("gateswa", {"window": 0}, "window=0: must be >= 1"),
        ("gateswa", {"layers": "7"}, "layer 7 does not exist"),
        ("gateswa", {"full_layers": "every:0"}, "every:K"),
        ("gateswa", {"gate": "tokenwise"}, "gate='tokenwise'"),
        ("gateswa", {"init": "magic"}, "init='magic'"),
        ("linear", {}, "unknown target 'linear'"),
    ],
)
def test_impossible_settings_are_rejected_in_one_line(target, args, message):
    with pytest.raises(AttnEditError, match=message) as err:
        edited_config(tiny_teacher("llama").config, target, args)
    assert "\n" not in str(err.value)


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(AttnEditError, match="supported families: .*llama.*qwen3_moe"):
        family_for(GPT2Config())
