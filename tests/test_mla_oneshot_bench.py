"""benchmarks/mla_oneshot.py's KL by position: its buckets are the KL of the positions they hold."""

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny import perturbed, tiny_ids, tiny_teacher

from attnedit.surgery import edit_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mla_oneshot.py"


def _bench():
    spec = importlib.util.spec_from_file_location("mla_oneshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kl_by_position_buckets_are_the_kl_of_their_positions():
    teacher = perturbed(tiny_teacher("llama"))
    student = perturbed(edit_model(teacher, "mla", {"kv_lora_rank": 8, "qk_rope_head_dim": 8}), 0.2)
    ids = tiny_ids(batch=2, length=24)
    with torch.no_grad():
        buckets = _bench().kl_by_position(teacher, student, ids, 8)
        lt = teacher(input_ids=ids).logits.float().log_softmax(-1)
        ls = student(input_ids=ids).logits.float().log_softmax(-1)
        per_position = (lt.exp() * (lt - ls)).sum(-1).mean(0)  # [positions], mean over the blocks
    assert len(buckets) == 3
    expected = [float(per_position[s : s + 8].mean()) for s in (0, 8, 16)]
    assert buckets == pytest.approx(expected, abs=1e-4)  # the script rounds to 4 decimals
    assert min(buckets) > 0
