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
