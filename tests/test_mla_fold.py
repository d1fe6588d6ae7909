"""MLA's absorbed decode folded into its projections (``model.fold_absorbed()``, ``targets/mla.py``'s
``FoldedAbsorbed``): the same logits with fewer kernels, folded only where it reads little more, kept current
through updates, casts and hooks, and counted by the bench."""

from __future__ import annotations

import pytest
import torch
from test_static_cache import static_logits
from test_targets import TARGET_CASES, incremental_logits
from tiny import tiny_ids, tiny_teacher

from attnedit.eval.bench import BenchSettings, run_bench
from attnedit.eval.bench.timing import bytes_per_step, weight_bytes
from attnedit.surgery import edit_model
from attnedit.targets.mla import MLAAttention

MLA_CASES = [c for c in TARGET_CASES if c.startswith("mla")]


def _calls(monkeypatch, module, name):
    calls, real = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _decode_step_calls(student, ids, monkeypatch) -> tuple[int, int]:
    """(F.linear calls, torch.einsum calls) of one decode step over a static cache after ``ids[:, :-1]``."""
    import torch.nn.functional as F

    cache = student.new_cache(static=True, batch_size=ids.shape[0], max_length=ids.shape[1] + 2)
    student(ids[:, :-1], cache=cache, use_cache=True)
    linear, einsum = _calls(monkeypatch, F, "linear"), _calls(monkeypatch, torch, "einsum")
    student(ids[:, -1:], cache=cache, use_cache=True)
    monkeypatch.undo()
    return len(linear), len(einsum)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2"])
@pytest.mark.parametrize("case", MLA_CASES)
def test_folded_decode_equals_the_unfolded_one_with_two_fewer_kernels_a_layer(family, case, monkeypatch):
    """Folded, every MLA layer decodes through one projection less and no per-head products: the same logits
    through a static cache, a growing one (short calls take the absorbed path too) and the full forward, and
    neither torch.einsum call of the absorbed decode is left."""
    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher(family), target, args).eval()
    ids = tiny_ids(length=21)
    layers = len(student.attentions())
    with torch.no_grad():
        want_full, want_static = student(ids).logits, static_logits(student, ids)[0]
        want_growing = incremental_logits(student, ids)[0]
        linear, einsum = _decode_step_calls(student, ids, monkeypatch)
        assert student.fold_absorbed() is student
        assert student.folded_sides() == {"query+output": layers}  # tiny latents: both sides fold
        torch.testing.assert_close(student(ids).logits, want_full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(static_logits(student, ids)[0], want_static, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(incremental_logits(student, ids)[0], want_growing, atol=1e-5, rtol=1e-4)
        folded_linear, folded_einsum = _decode_step_calls(student, ids, monkeypatch)
    assert einsum >= 2 * layers and folded_einsum == einsum - 2 * layers, (einsum, folded_einsum)
    # q_proj + kv_a become one GEMM (no q_lora); with q_lora, q_b's GEMM stays; o_proj's GEMM stays either way
    saved = layers if args.get("q_lora_rank") is None else 0
    assert folded_linear == linear - saved, (linear, folded_linear)
    student.fold_absorbed(False)
    assert student.folded_sides() == {} and student.folded_bytes() == (0, 0)


def _layer(hidden, heads, nope, rope, v, rank, q_lora=None) -> MLAAttention:
    spec = {"hidden_size": hidden, "num_heads": heads}
    with torch.device("meta"):
        return MLAAttention(spec, {"rope_theta": 1e6}, 0, rank, rope, nope, v, q_lora_rank=q_lora).to(torch.bfloat16)


@pytest.mark.parametrize(
    "shape,kernel_bytes,sides",
    [
        ((896, 14, 32, 32, 64, 56), 4 << 20, "query+output"),  # recipes/qwen2.5-0.5b-mla.yaml: rank 56 + 32
        ((896, 14, 32, 32, 64, 56), 0, "output"),  # the folded query is larger; the output is smaller
        ((4096, 32, 64, 64, 128, 512, 1536), 4 << 20, "none"),  # recipes/qwen3-8b-mla.yaml: 512 + 64, q_lora 1536
        ((2048, 16, 128, 64, 128, 512), 4 << 20, "none"),  # DeepSeek-V2-Lite
    ],
)
def test_a_side_folds_only_where_it_reads_at_most_a_kernels_worth_more(shape, kernel_bytes, sides):
    """At Qwen2.5-0.5B's rank 56 both sides fold (the query reads 0.55 MB more a layer, the output 0.30 MB less);
    at 512 + 64 neither (3-4x the bytes); the extra bytes and memory are what the folded shapes say."""
    attn = _layer(*shape)
    attn.fold_absorbed(True, kernel_bytes)
    folded = attn._folded
    assert folded.sides == sides
    hidden, heads, nope, rope, v, rank = shape[:6]
    d_in = shape[6] if len(shape) > 6 else hidden
    want_held = want_delta = 0
    if folded.query is not None:
        rows = heads * (rank + rope) + (rank + rope if len(shape) == 6 else 0)  # + the latent's rows without q_lora
        want_held += rows * d_in * 2
        want_delta += heads * (rank + rope) * d_in * 2 - heads * (nope + rope) * d_in * 2 - heads * nope * rank * 2
    if folded.output is not None:
        want_held += hidden * heads * rank * 2
        want_delta += hidden * heads * rank * 2 - hidden * heads * v * 2 - heads * v * rank * 2
    assert folded.extra_bytes == want_held and folded.read_delta(attn) == want_delta
    if sides == "query+output":
        assert 0 < want_delta <= 2 * kernel_bytes


def test_folded_weights_follow_updates_casts_hooks_and_gradients(tmp_path):
    """An in-place update of a source weight is folded again on the next call; ``.to()`` folds at once into the
    new dtype; a forward hook on a folded projection sees its call (the unfolded path runs); with gradients the
    unfolded path runs and trains ``kv_b_proj``; state_dict and saved checkpoints are unchanged."""
    student = edit_model(tiny_teacher("qwen2"), *TARGET_CASES["mla-teacher"]).eval()
    ids = tiny_ids(length=21)
    keys = set(student.state_dict())
    student.fold_absorbed()
    attn = student.attentions()[1]
    with torch.no_grad():
        attn.o_proj.weight.mul_(1.5)
        attn.kv_b_proj.weight.add_(0.01)
        folded = static_logits(student, ids)[0]
        student.fold_absorbed(False)
        torch.testing.assert_close(folded, static_logits(student, ids)[0], atol=1e-5, rtol=1e-4)
        student.fold_absorbed()
        student.to(torch.float64)
        assert attn._folded.output.dtype == torch.float64 and attn._folded.current(attn)
        torch.testing.assert_close(static_logits(student, ids)[0], folded.double(), atol=1e-4, rtol=1e-4)
        seen = []
        handle = attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        static_logits(student, ids)
        handle.remove()
        assert sum(shape[1] == 1 for shape in seen) == ids.shape[1] - 10  # each decoded token after the 7 + 3 prefill
        calls = []
        real = attn.o_proj.forward  # not a hook: the folded path may skip it
        attn.o_proj.forward = lambda x: calls.append(x.shape) or real(x)
        static_logits(student, ids)  # unhooked, the folded calls (all absorbed here: 16 tokens or fewer) skip o_proj
        assert calls == []
        student.fold_absorbed(False)
        static_logits(student, ids)
        assert len(calls) == ids.shape[1] - 8  # unfolded, every call runs it
        del attn.o_proj.forward
        student.fold_absorbed()
    assert set(student.state_dict()) == keys
    student.to(torch.float32)
    cache = student.new_cache()
    with torch.no_grad():
        student(ids[:, :9], past_key_values=cache, use_cache=True)
    step = student(ids[:, 9:10], past_key_values=cache, use_cache=True).logits  # absorbed, gradients wanted: unfolded
    step.pow(2).mean().backward()
    assert attn.kv_b_proj.weight.grad is not None and attn.kv_b_proj.weight.grad.abs().sum() > 0
    student.save_pretrained(tmp_path / "m")
    again = type(student).from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert set(again.state_dict()) == keys and again.folded_sides() == {}
    with torch.no_grad():
        torch.testing.assert_close(static_logits(again, ids)[0], static_logits(student, ids)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", MLA_CASES)
def test_folded_decode_compiles_to_one_graph(case):
    """fullgraph=True fails on any graph break; one frame for five steps (no re-trace) with the decode folded."""
    from torch._dynamo.testing import CompileCounter

    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher("qwen3"), target, args).eval().fold_absorbed()
    ids = tiny_ids(length=9)
    cache = student.new_cache(static=True, batch_size=2, max_length=20)
    with torch.no_grad():
        student(ids, past_key_values=cache, use_cache=True)
        counter = CompileCounter()
        torch._dynamo.reset()
        step = torch.compile(student, backend=counter, fullgraph=True)
        token = ids[:, -1:].clone(memory_format=torch.contiguous_format)
        for _ in range(5):
            out = step(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
    assert counter.frame_count == 1


def test_bench_folds_the_student_counts_its_bytes_and_unfolds_it_after():
    """--fold-absorbed: the student decodes folded (the header says so); its bound counts the folded weights in
    place of those they stand in for, its memory the copies; after the run the student is unfolded."""
    teacher = tiny_teacher("qwen3")
    student = edit_model(teacher, "mla", {"kv_lora_rank": 24})
    plain = bytes_per_step(student, student.config, 1, 8, "float32")
    held = weight_bytes(student)
    student.fold_absorbed()
    extra, delta = student.folded_bytes()
    assert extra > 0 and delta != 0
    assert bytes_per_step(student, student.config, 1, 8, "float32") == plain + delta
    assert weight_bytes(student) == held + extra
    student.fold_absorbed(False)
    settings = BenchSettings([8], [1], 2, 1, 0, stock=False, fold_absorbed=True)
    result = run_bench(student, teacher, settings, "float32", log=lambda _: None)
    assert "MLA decode folded" in result["engines"]["student"]
    assert result["runs"][0]["student"]["bytes_per_step"] == plain + delta
    assert student.folded_sides() == {}


def test_the_compiled_folded_step_has_no_per_head_products(monkeypatch):
    """benchmarks/decode_ops.py's counts: the traced decode step of an MLA student has two ``bmm`` a layer
    unfolded and none folded, and the model is left as it came (unfused, unfolded)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_ops.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as when it runs: its folder first on the path
    spec = importlib.util.spec_from_file_location("decode_ops", script)
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    student = edit_model(tiny_teacher("qwen2"), "mla", {"init": "random"}).eval()
    layers = len(student.attentions())
    plain, folded = ops.step_ops(student, False, False), ops.step_ops(student, False, True)
    assert plain["bmm"] == 2 * layers and folded["bmm"] == 0
    assert sum(folded.values()) < sum(plain.values())
    assert student.folded_sides() == {} and student.attentions()[0]._fused is None
