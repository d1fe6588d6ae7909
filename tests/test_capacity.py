"""Serving capacity in the bench (CPU, tiny models): the search, the KV-only limit, the cells' figures and the
ratios to the teacher, the back-off when the timed run needs more than the probe, and the models' weights
leaving and returning around each engine's measurement."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny import tiny_teacher

from attnedit.errors import AttnEditError
from attnedit.eval.bench import AttnEditEngine, BenchSettings, format_bench, format_capacity, run_bench, weight_bytes
from attnedit.eval.bench.capacity import capacity_cell, kv_only_limit, largest_batch, resident_alone, tensors_to_move
from attnedit.eval.kv import analytic_cache_bytes
from attnedit.surgery import edit_model

SETTINGS = BenchSettings(contexts=[20], batches=[1], decode_tokens=2, repeats=1, warmup=0, stock=False, capacity=True, memory_gb=2e-3)


@pytest.mark.parametrize("limit", [0, 1, 2, 7, 37, 64])
def test_largest_batch_finds_the_threshold(limit):
    calls = []

    def ok(b):
        calls.append(b)
        return b <= limit

    assert largest_batch(ok, 64) == min(limit, 64)
    assert len(calls) <= 8  # upper bound first, then bisection


def test_kv_only_limit():
    assert kv_only_limit(100, 30, 7) == 10
    assert kv_only_limit(100, 130, 7) == 0 and kv_only_limit(100, 30, 0) == 0


@pytest.mark.parametrize("target,args", [("mla", {"kv_lora_rank": 16}), ("gateswa", {"window": 6, "sink": 1, "full_layers": "every:2"})])
def test_capacity_in_bench_json(target, args):
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, target, args)
    result = run_bench(student, teacher, SETTINGS, "float32", log=lambda _: None)
    (row,) = result["capacity"]
    memory = int(SETTINGS.memory_gb * 2**30)
    for name, model in (("student", student), ("teacher", teacher)):
        cell = row[name]
        per_seq = analytic_cache_bytes(model.config, cell["kv_tokens"], 1, "float32")
        assert cell["cache_bytes_per_sequence"] == per_seq and cell["memory_bytes"] == memory
        assert cell["kv_only_limit"] == (memory - cell["weight_bytes"]) // per_seq > 1
        assert cell["largest_batch"] == cell["kv_only_limit"]  # nothing runs out of memory on the CPU
        assert cell["decode_tok_s"] > 0 and cell["step_ms"] > 0
    assert row["teacher"]["weight_bytes"] == weight_bytes(teacher)
    assert row["ratio"]["largest_batch"] == row["student"]["largest_batch"] / row["teacher"]["largest_batch"] > 1
    assert row["ratio"]["decode_tok_s"] == row["student"]["decode_tok_s"] / row["teacher"]["decode_tok_s"]
    assert "serving capacity" in format_bench(result)
    json.dumps(result)


def test_capacity_backs_off_when_the_timed_run_does_not_fit():
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "mla", {})
    engine = AttnEditEngine(student, compile=False)
    served = []
    real_serve = engine.serve

    def serve(b, context, settings):
        served.append(b)
        if b > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_serve(b, context, settings)

    engine.serve = serve
    cell = capacity_cell(engine, 12, SETTINGS, int(SETTINGS.memory_gb * 2**30), "float32", weight_bytes(student), ok=lambda b: b <= 9)
    assert cell["largest_batch"] == 5 and served[0] == 9 and cell["decode_tok_s"] > 0


def test_capacity_cell_gives_the_step_over_its_hbm_bound_at_the_largest_batch():
    teacher = tiny_teacher("qwen2")
    student = edit_model(teacher, "mla", {"kv_lora_rank": 8})
    engine, memory, weights = AttnEditEngine(student, compile=False), int(SETTINGS.memory_gb * 2**30), weight_bytes(student)
    cell = capacity_cell(engine, 12, SETTINGS, memory, "float32", weights, ok=lambda b: b <= 6, bandwidth=1e9)
    bound_ms = (weights + analytic_cache_bytes(student.config, 12, 6, "float32")) / 1e9 * 1e3  # every weight, 6 x 12 tokens of KV
    assert cell["largest_batch"] == 6 and cell["hbm_bound_ms"] == pytest.approx(bound_ms)
    assert cell["step_over_bound"] == pytest.approx(cell["step_ms"] / bound_ms)
    # without a measured bandwidth (a CPU run) there is no bound; nor when no batch fits
    plain = capacity_cell(engine, 12, SETTINGS, memory, "float32", weights, ok=lambda b: b <= 6)
    none_fit = capacity_cell(engine, 12, SETTINGS, memory, "float32", weights, ok=lambda b: False, bandwidth=1e9)
    assert plain["hbm_bound_ms"] is None and plain["step_over_bound"] is None
    assert none_fit["largest_batch"] == 0 and none_fit["step_over_bound"] is None and none_fit["step_ms"] is None


def test_bench_passes_its_measured_bandwidth_to_the_capacity_cells(monkeypatch):
    from attnedit.eval.bench import runner

    monkeypatch.setattr(runner, "copy_bandwidth", lambda device: 2e9)  # as a GPU run measures it
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "gateswa", {"window": 6, "sink": 1, "full_layers": "every:2"})
    (row,) = run_bench(student, teacher, SETTINGS, "float32", log=lambda _: None)["capacity"]
    for name, model in (("student", student), ("teacher", teacher)):
        cell = row[name]
        bytes_ = weight_bytes(model) + analytic_cache_bytes(model.config, 20, cell["largest_batch"], "float32")
        assert cell["step_over_bound"] == pytest.approx(cell["step_ms"] / (bytes_ / 2e9 * 1e3))
    table = format_capacity([row]).splitlines()
    assert "step/bound" in table[1] and f"{row['student']['step_over_bound']:.2f}" in table[-1].split()


def test_probe_fills_every_row_of_the_cache():
    teacher = tiny_teacher("qwen2")
    student = edit_model(teacher, "gateswa", {"window": 5, "sink": 1, "full_layers": "1"})
    engine = AttnEditEngine(student, compile=False)
    cache, token = engine._one_row_prefilled(3, 14, dataclasses.replace(SETTINGS, seed=4))
    assert token.shape == (3, 1) and int(cache.n_cached_device) == 14 and cache.real.tolist() == [14] * 3
    for layer in cache.layers:
        for t in layer.tensors():
            assert torch.equal(t[2], t[0]) and t[0].abs().sum() > 0


def test_only_the_other_models_own_weights_move():
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "mla", {})
    other = edit_model(teacher, "gateswa", {"window": 4})
    moved = tensors_to_move(student, [teacher, other, other], on_device=lambda t: True)
    ids = {id(t) for t in moved}
    assert len(ids) == len(moved)  # each once, though `other` is listed twice and shares the teacher's backbone
    assert id(student.model.embed_tokens.weight) not in ids  # shared by all three: stays
    assert id(teacher.model.layers[0].self_attn.q_proj.weight) in ids  # the teacher's own attention: moves
    assert id(other.model.layers[0].self_attn.q_proj.weight) in ids
    assert not {id(t) for t in student.parameters()} & ids
    with resident_alone(student, [teacher]):  # on a CPU nothing is on a device: nothing moves, nothing breaks
        assert teacher.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"


def test_capacity_on_cpu_needs_memory():
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "mla", {})
    with pytest.raises(AttnEditError, match="--memory-gb"):
        run_bench(student, teacher, dataclasses.replace(SETTINGS, memory_gb=None), "float32", log=lambda _: None)
