"""Static caches (allocated once, written in place) and the compiled decode step: decoding through them
equals the full forward for every family and target, they hold the analytic bytes, generate() uses
them, and a decode step traces into one graph that is not re-traced from step to step."""

from __future__ import annotations

import pytest
import torch
from test_targets import TARGET_CASES, check_cached_decoding, check_left_padded_decoding, incremental_logits
from tiny import FAMILY_NAMES, tiny_ids, tiny_teacher

from attnedit.eval.kv import kv_summary
from attnedit.surgery import edit_model
from attnedit.targets.kernels import decode_attention_sdpa, sliding_attention, window_mask


def static_logits(model, ids, attention_mask=None, pieces=(7, 3)):
    cache = model.new_cache(static=True, batch_size=ids.shape[0], max_length=ids.shape[1] + 3)
    return incremental_logits(model, ids, attention_mask, pieces, cache)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("case", list(TARGET_CASES))
@torch.no_grad()
def test_static_cache_decoding_equals_full_forward(family, case):
    assert check_cached_decoding(family, case, static_logits).is_compileable


@pytest.mark.parametrize("case", list(TARGET_CASES))
@torch.no_grad()
def test_static_cache_with_left_padding(case):
    check_left_padded_decoding("qwen2", case, static_logits)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("target,args", [("mla", {}), ("gateswa", {"window": 6, "sink": 1, "full_layers": "1"})])
def test_static_cache_bytes_equal_analytic(family, target, args):
    student = edit_model(tiny_teacher(family), target, args)
    cache = student.new_cache(static=True, batch_size=3, max_length=29)
    analytic = kv_summary(student.config, 29, dtype="float32")["kv_bytes_total"] * 3
    assert cache.allocated_bytes() == analytic


def test_static_cache_overflow_is_one_line_error():
    student = edit_model(tiny_teacher("llama"), "mla", {})
    cache = student.new_cache(static=True, batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="static cache holds 8 tokens"):
        student(tiny_ids(batch=1, length=9), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("case", ["mla-random", "gateswa-teacher"])
@torch.no_grad()
def test_generate_static_equals_dynamic_and_manual(case):
    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher("llama"), target, args)
    ids = tiny_ids(length=12)
    static = student.generate(ids, max_new_tokens=9, do_sample=False)
    dynamic = student.generate(ids, max_new_tokens=9, do_sample=False, cache_implementation="dynamic")
    seq = ids
    for _ in range(9):  # greedy without any cache
        seq = torch.cat([seq, student(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(static, seq) and torch.equal(dynamic, seq)


@torch.no_grad()
def test_generate_left_padded_batch_matches_rows_alone():
    student = edit_model(tiny_teacher("qwen2"), "gateswa", {"window": 5, "sink": 0, "full_layers": "every:2"})
    ids = tiny_ids(length=10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    both = student.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = student.generate(ids[:1, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[0, 10:], alone[0, 7:])


@torch.no_grad()
def test_beam_search_reorders_the_cache():
    student = edit_model(tiny_teacher("llama"), "mla", {"seed": 2})
    ids = tiny_ids(batch=1, length=8)
    out = student.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    ref = student.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True, use_cache=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", ["mla-random", "gateswa-teacher", "gateswa-random"])
def test_decode_step_traces_into_one_graph_without_retracing(case, fused):
    """fullgraph=True fails on any graph break; the frame counter catches a re-trace per step (also with the
    projections fused)."""
    from torch._dynamo.testing import CompileCounter

    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher("qwen3"), target, args).fuse_projections(fused)
    ids = tiny_ids(length=9)
    cache = student.new_cache(static=True, batch_size=2, max_length=20)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # padding on, so the padded decode path is traced too
    with torch.no_grad():
        student(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        counter = CompileCounter()
        torch._dynamo.reset()
        step = torch.compile(student, backend=counter, fullgraph=True)
        token = ids[:, -1:].clone(memory_format=torch.contiguous_format)  # strides as in generate()
        for _ in range(5):
            out = step(input_ids=token, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
    assert counter.frame_count == 1
    assert cache.get_seq_length() == 14


def test_decode_reference_equals_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 8)
    valid = torch.rand(3, 10) > 0.3
    valid[:, 0] = True
    out = decode_attention_sdpa(q, k, v, torch.tensor(7), valid, 0.25)
    kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q, kk) * 0.25
    keep = (torch.arange(10) < 7)[None] & valid
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    ref = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,sink", [(4, 0), (5, 2), (64, 1)])
def test_sliding_attention_equals_masked_softmax(window, sink):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 19, 16), torch.randn(2, 2, 19, 16), torch.randn(2, 2, 19, 16)
    out = sliding_attention(q, k, v, window, sink, 0.25)
    idx = torch.arange(19)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.25
    scores = scores.masked_fill(~window_mask(idx, idx, window, sink), float("-inf"))
    ref = scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_matches_the_window_rule():
    """The FlexAttention mask used on GPUs for sliding layers: same visibility as window_mask."""
    from torch.nn.attention.flex_attention import create_mask

    window, sink, t = 5, 2, 23

    def mod(b, h, q, k):
        return (k <= q) & ((q - k < window) | (k < sink))

    dense = create_mask(mod, 1, 1, t, t, device="cpu")[0, 0]
    idx = torch.arange(t)
    assert torch.equal(dense, window_mask(idx, idx, window, sink))


def test_latent_decode_reads_values_from_the_keys():
    """MLA's decode passes v=None: values are the keys' first columns; same result as separate values."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 24), torch.randn(2, 1, 12, 24)
    n = torch.tensor(9)
    got = decode_attention_sdpa(q, k, None, n, None, 0.2, v_dim=16)
    ref = decode_attention_sdpa(q, k, k[..., :16], n, None, 0.2)
    assert got.shape == (2, 5, 16)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["mla-random", "gateswa-teacher"])
def test_generate_compiles_the_decode_step_once(case):
    """transformers' automatic compile (forced on CPU, eager backend) takes the static cache's decode step:
    one graph, no graph break (fullgraph), no re-trace per step, and the same tokens as without it."""
    from transformers import CompileConfig

    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher("llama"), target, args)
    ids = tiny_ids(length=10)
    ref = student.generate(ids, max_new_tokens=8, do_sample=False, disable_compile=True)
    graphs = []

    def backend(gm, example_inputs):  # a plain function: transformers deep-copies its compile config
        graphs.append(gm)
        return gm.forward

    config = CompileConfig(backend=backend, mode=None, fullgraph=True)
    config._compile_all_devices = True
    torch._dynamo.reset()
    out = student.generate(ids, max_new_tokens=8, do_sample=False, compile_config=config)
    assert torch.equal(out, ref)
    assert len(graphs) == 1


@pytest.mark.parametrize("sink", [0, 3])
def test_kept_tokens_are_the_sinks_and_the_last_window_of_any_chunk(sink):
    """The ring keeps, of tokens start..end-1, those below ``sink`` and the last ``window`` ones; computed in
    O(window) (a long prefill does not loop over every token on the host), on the host and on the device alike."""
    from attnedit.targets.caches import kept_index, kept_tokens

    window = 5
    for start in range(0, 12):
        for end in range(start, 30):
            want = [p for p in range(start, end) if p < sink or p >= end - window]
            assert kept_tokens(start, end, sink, window) == want
            assert kept_index(start, end, sink, window, "cpu").tolist() == want
    assert len(kept_tokens(0, 10**7, sink, window)) == sink + window


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("case", list(TARGET_CASES))
@torch.no_grad()
def test_compiled_prefill_equals_eager_with_one_graph_per_block_for_every_prompt_length(family, case):
    """compile_prefill(): the norms, MLP and residuals around each attention run compiled for calls of more than
    one token (dynamic shapes: two prompt lengths and a second batch size compile once), with the eager results;
    decode steps and the default model are untouched."""
    from torch._dynamo.utils import counters

    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher(family), target, args).eval()
    ids = tiny_ids(length=21)
    want = [static_logits(student, ids[:, :n])[0] for n in (21, 17)]
    want.append(static_logits(student, ids[:1, :19])[0])
    torch._dynamo.reset()
    counters.clear()
    assert student.compile_prefill("aot_eager") is student
    got = [static_logits(student, ids[:, :n])[0] for n in (21, 17)]
    got.append(static_logits(student, ids[:1, :19])[0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 4, dict(counters["stats"])  # before/after the attention (MoE may split one); no per-length graphs
    student.compile_prefill(None)
    counters.clear()
    static_logits(student, ids)
    assert counters["stats"]["unique_graphs"] == 0


@torch.no_grad()
def test_a_failing_prefill_compiler_warns_once_and_runs_eagerly(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    student = edit_model(tiny_teacher("llama"), *TARGET_CASES["gateswa-teacher"]).eval()
    ids = tiny_ids(length=21)
    want = static_logits(student, ids)[0]
    torch._dynamo.reset()
    student.compile_prefill(broken)
    got = static_logits(student, ids)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    err = capsys.readouterr().err
    assert err.count("compiling the prefill failed") == 1 and student.prefill_backend is None


def _linear_calls(monkeypatch):
    import torch.nn.functional as F

    calls, real = [], F.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "linear", counting)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_fused_projections_decode_the_same_with_fewer_gemms_and_no_extra_memory(family, case, monkeypatch):
    """fuse_projections(): q/k/v (+ gate; MLA: the query's and the latent's projections) and a dense MLP's gate/up
    run as one GEMM each without gradients. Same logits, full and cached; fewer GEMMs per decode step; the
    parameters are views of the fused weights (no extra memory, state_dict unchanged)."""
    target, args = TARGET_CASES[case]
    student = edit_model(tiny_teacher(family), target, args).eval()
    ids = tiny_ids(length=21)
    with torch.no_grad():
        want_full = student(ids).logits
        want_inc = static_logits(student, ids)[0]
        cache = student.new_cache(static=True, batch_size=ids.shape[0], max_length=ids.shape[1] + 2)
        student(ids[:, :-1], cache=cache, use_cache=True)
        calls = _linear_calls(monkeypatch)
        student(ids[:, -1:], cache=cache, use_cache=True)
        unfused = len(calls)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    params = sum(p.numel() for p in student.parameters())
    storages = {p.untyped_storage().data_ptr() for p in student.parameters()}
    assert student.fuse_projections() is student
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, want_full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(static_logits(student, ids)[0], want_inc, atol=1e-5, rtol=1e-4)
        cache = student.new_cache(static=True, batch_size=ids.shape[0], max_length=ids.shape[1] + 2)
        student(ids[:, :-1], cache=cache, use_cache=True)
        calls.clear()
        student(ids[:, -1:], cache=cache, use_cache=True)
        assert len(calls) < unfused, (len(calls), unfused)
    attn = student.attentions()[0]
    assert attn.input_linears()[0].weight.untyped_storage().data_ptr() == attn._fused.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in student.parameters()) == params and len({p.untyped_storage().data_ptr() for p in student.parameters()}) < len(storages)
    got = student.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    student.fuse_projections(False)
    assert attn._fused is None and len({p.untyped_storage().data_ptr() for p in student.parameters()}) == len(storages)


def test_fused_projections_follow_training_updates_casts_and_save(tmp_path):
    """The fused weights share the parameters' memory: an in-place update (an optimizer step) shows in the next
    forward; gradients still reach the separate parameters; after a cast the weights are fused again; a model
    saved while fused reloads (unfused) with the same logits."""
    student = edit_model(tiny_teacher("qwen2"), *TARGET_CASES["gateswa-teacher"]).eval().fuse_projections()
    ids = tiny_ids(length=21)
    loss = student(ids).logits.float().pow(2).mean()  # with gradients: the separate layers, autograd intact
    loss.backward()
    attn = student.attentions()[1]
    assert attn.q_proj.weight.grad is not None and attn.g_proj.weight.grad is not None
    with torch.no_grad():
        attn.q_proj.weight.add_(0.05)
        student.model.layers[1].mlp.up_proj.weight.mul_(1.1)
        fused = student(ids).logits
        student.fuse_projections(False)
        torch.testing.assert_close(fused, student(ids).logits, atol=1e-5, rtol=1e-4)
        student.fuse_projections()
        student.to(torch.float64)  # new parameter tensors: fused again on the next call
        torch.testing.assert_close(student(ids).logits, fused.double(), atol=1e-4, rtol=1e-4)
        assert attn._fused.weight.dtype == torch.float64
        student.save_pretrained(tmp_path / "m")
        again = type(student).from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_fused_projections_stay_correct_when_layers_or_parameters_are_replaced_or_hooked():
    """Fusing inside inference_mode leaves trainable parameters; load_state_dict(assign=True) and .to() re-fuse at
    once; a layer swapped in after fusing, or a forward hook on a fused layer, makes that group run unfused."""
    student = edit_model(tiny_teacher("llama"), *TARGET_CASES["gateswa-teacher"]).eval()
    ids = tiny_ids(length=21)
    with torch.inference_mode():
        student.fuse_projections()
    attn = student.attentions()[0]
    assert not attn.q_proj.weight.is_inference()
    student(ids).logits.float().mean().backward()  # trainable as before
    state = {k: v.clone() + 0.01 for k, v in student.state_dict().items()}
    student.load_state_dict(state, assign=True)
    assert attn._fused.current() and student.model.layers[0].mlp._attnedit_gate_up.current()
    student.to(torch.float64)  # re-fused at once: no stale fused copy is left behind
    assert attn._fused.weight.dtype == torch.float64 and attn._fused.current()
    student.to(torch.float32)
    with torch.no_grad():
        fused = student(ids).logits
        student.fuse_projections(False)
        torch.testing.assert_close(fused, student(ids).logits, atol=1e-5, rtol=1e-4)
        student.fuse_projections()
        swapped = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=attn.q_proj.bias is not None)
        attn.q_proj = swapped  # the new layer is used: the fused group steps aside
        x = torch.ones(1, 2, swapped.in_features)
        torch.testing.assert_close(attn.projections(x)[0], swapped(x))
        seen = []
        mlp = student.model.layers[1].mlp
        handle = mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        student(ids)
        handle.remove()
        assert seen  # the hooked MLP ran its separate layers
