"""A long prefill runs in chunks of at most ``model.prefill_chunk`` tokens (cache rows in groups, the sequence in
pieces): its logits, and the decoding after it, equal the prefill in one piece for every family and target, with
static and growing caches and with padding; each layer call stays within the token budget; generate() computes
logits for the last position only."""

from __future__ import annotations

import pytest
import torch
from test_targets import TARGET_CASES
from tiny import FAMILY_NAMES, tiny_ids, tiny_teacher

from attnedit.surgery import edit_model, teacher_on_attnedit

CASES = {**TARGET_CASES, "teacher-engine": None}


def _model(family: str, case: str):
    teacher = tiny_teacher(family)
    if CASES[case] is None:
        return teacher_on_attnedit(teacher)
    target, args = CASES[case]
    return edit_model(teacher, target, args)


def _prefill_then_decode(model, ids, mask, static: bool, chunk, keep: int = 0, steps: int = 3):
    model.prefill_chunk = chunk
    b, t = ids.shape
    cache = model.new_cache(static=True, batch_size=b, max_length=t + steps) if static else model.new_cache()
    out = [model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits]
    token = out[0][:, -1:].argmax(-1)
    for _ in range(steps):
        if mask is not None and not static:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_mask = None if mask is None else (mask[:, -1:] if static else mask)
        out.append(model(token, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits)
        token = out[-1][:, -1:].argmax(-1)
    return out, cache


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_chunked_prefill_equals_one_piece(family, case, static):
    model = _model(family, case)
    ids = tiny_ids(batch=3, length=23)  # longer than every window: chunks start inside and past the window
    whole, _ = _prefill_then_decode(model, ids, None, static, chunk=None)
    chunked, cache = _prefill_then_decode(model, ids, None, static, chunk=10)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1] + 3


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_chunked_prefill_with_left_padding(case, static):
    model = _model("qwen2", case)
    ids = tiny_ids(batch=3, length=19)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0  # padding that spans a whole chunk of this row
    whole, _ = _prefill_then_decode(model, ids, mask, static, chunk=None)
    chunked, _ = _prefill_then_decode(model, ids, mask, static, chunk=8)
    torch.testing.assert_close(chunked[0][0, 4:], whole[0][0, 4:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[0][1], whole[0][1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[0][2, 9:], whole[0][2, 9:], atol=1e-5, rtol=1e-4)
    for a, b in zip(chunked[1:], whole[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", [1, 5, 12])
@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@torch.no_grad()
def test_chunked_prefill_keeps_only_the_asked_logits(keep, static):
    model = _model("llama", "mla-random")
    ids = tiny_ids(batch=2, length=21)
    whole, _ = _prefill_then_decode(model, ids, None, static, chunk=None, steps=0)
    chunked, _ = _prefill_then_decode(model, ids, None, static, chunk=8, keep=keep, steps=0)
    assert chunked[0].shape[1] == keep
    torch.testing.assert_close(chunked[0], whole[0][:, -keep:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@pytest.mark.parametrize("case", ["mla-random", "gateswa-random"])
@torch.no_grad()
def test_every_layer_call_stays_within_the_budget(case, static):
    """The working set is bounded: no layer ever sees more than ``prefill_chunk`` tokens at once (the static
    cache prefills groups of rows; a growing one shortens the pieces so that batch x piece fits)."""
    model = _model("qwen3", case)
    seen = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2].numel()))
    try:
        _prefill_then_decode(model, tiny_ids(batch=4, length=30), None, static, chunk=16, steps=0)
    finally:
        hook.remove()
    assert max(seen) <= 16 and sum(seen) == 4 * 30


@torch.no_grad()
def test_generate_prefills_in_chunks_and_computes_one_position_of_logits():
    model = _model("llama", "gateswa-teacher")
    ids = tiny_ids(batch=2, length=20)
    model.prefill_chunk = None
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.prefill_chunk = 8
    positions = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: positions.append(args[0].shape[1]))
    try:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out, ref)
    assert positions and set(positions) == {1}  # the prefill computes logits for its last position only


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@torch.no_grad()
def test_chunked_prefill_after_cached_tokens_with_a_full_mask(static):
    """A second long prompt piece after cached tokens, its mask covering the cached columns too (as generate()
    passes it): each chunk takes its own columns."""
    model = _model("qwen2", "gateswa-teacher")
    ids = tiny_ids(batch=2, length=26)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def run(chunk):
        model.prefill_chunk = None
        cache = model.new_cache(static=True, batch_size=2, max_length=26) if static else model.new_cache()
        model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
        model.prefill_chunk = chunk
        return model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True).logits

    torch.testing.assert_close(run(8), run(None), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
@pytest.mark.parametrize("case", ["gateswa-random", "gateswa-teacher", "gateswa-wide", "split-heads"])
@torch.no_grad()
def test_long_chunks_of_sliding_layers_run_on_flex_attention_with_the_same_logits(case, static, monkeypatch):
    """A sliding layer's prefill chunk of 128+ tokens after cached ones runs on FlexAttention with a block mask over
    the ring buffer's slots and the chunk (built once per chunk for every layer of a window), not on a dense mask:
    the same logits as the prefill in one piece, and as the dense path. Run eagerly on the CPU here (on CUDA the
    compiled kernel)."""
    from attnedit.targets import common

    if case == "split-heads":
        from test_split_heads import split_student

        model = split_student("mistral")
    elif case == "gateswa-wide":  # a window wider than the first chunk: the second sees a ring not yet full
        model = edit_model(tiny_teacher("qwen3"), "gateswa", {"window": 200, "sink": 4, "init": "teacher", "full_layers": "every:2"})
    else:
        model = _model("qwen3", case)
    ids = tiny_ids(batch=1, length=430)
    whole, _ = _prefill_then_decode(model, ids, None, static, chunk=None)
    dense, _ = _prefill_then_decode(model, ids, None, static, chunk=150)
    calls, masks = [], []
    real_attention, real_mask = common.sliding_chunk_attention, common.chunk_block_mask
    monkeypatch.setattr(common, "chunk_on_flex", lambda q: True)
    monkeypatch.setattr(common, "sliding_chunk_attention", lambda *a: calls.append(1) or real_attention(*a))
    monkeypatch.setattr(common, "chunk_block_mask", lambda *a: masks.append(1) or real_mask(*a))
    flex, _ = _prefill_then_decode(model, ids, None, static, chunk=150)
    for a, b, c in zip(flex, dense, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    sliding = sum(getattr(a, "window", None) is not None for a in model.attentions())
    assert len(calls) == 2 * sliding  # chunks 2 and 3 (150 and 130 tokens) of every sliding layer
    assert len(masks) == 2  # one block mask a chunk, shared by the layers


@torch.no_grad()
def test_a_failing_flex_chunk_falls_back_to_the_dense_mask_once_and_running_out_of_memory_does_not(monkeypatch, capsys):
    """A compiler failure on the FlexAttention chunk path prints one warning and the dense path serves that call and
    every later one (the same logits); running out of memory there is raised (the capacity search counts it)."""
    from attnedit.targets import common

    model = _model("qwen3", "gateswa-teacher")
    ids = tiny_ids(batch=1, length=430)
    want, _ = _prefill_then_decode(model, ids, None, True, chunk=150)
    calls = []

    def failing(*a):
        calls.append(1)
        raise RuntimeError("backend compiler failed\nmore")

    monkeypatch.setattr(common, "_CHUNK_FLEX", {"ok": True})
    monkeypatch.setattr(common, "chunk_on_flex", lambda q: common._CHUNK_FLEX["ok"])
    monkeypatch.setattr(common, "sliding_chunk_attention", failing)
    got, _ = _prefill_then_decode(model, ids, None, True, chunk=150)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    warning = capsys.readouterr().err
    assert len(calls) == 1 and warning.count("warning: FlexAttention failed") == 1 and "more" not in warning
    monkeypatch.setattr(common, "_CHUNK_FLEX", {"ok": True})
    monkeypatch.setattr(common, "sliding_chunk_attention", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        _prefill_then_decode(model, ids, None, True, chunk=150)


def test_the_remote_codes_out_of_memory_check_agrees_with_attnedits():
    """The chunk fallback raises exactly the errors the capacity search counts as not fitting: the remote code's
    copy of the check (it cannot import attnedit) answers as ``attnedit.errors.is_out_of_memory`` does."""
    from torch._dynamo.exc import BackendCompilerFailed

    from attnedit.errors import is_out_of_memory
    from attnedit.targets import common

    cases = [
        torch.OutOfMemoryError("CUDA out of memory"),
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("not enough memory: you tried to allocate"),
        BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("CUDA out of memory"), None),
        BackendCompilerFailed(lambda: None, ValueError("bad graph"), None),
        RuntimeError("backend compiler failed"),
        ValueError("out of memory, says a message"),
    ]
    answers = [is_out_of_memory(e) for e in cases]
    assert answers == [common.is_out_of_memory(e) for e in cases]
    assert answers == [True] * 5 + [False] * 3


def test_the_prefill_chunk_benchmark_times_and_profiles_every_model_and_chunk(tmp_path, monkeypatch, capsys):
    """benchmarks/prefill_chunk.py on the CPU with a tiny config: a row per model and chunk size, each with its
    TTFT and, with --profile, where the prefill's time went (attention and GEMM kernels among them); chunked MLA
    runs more operations than one piece (its chunks re-expand the cached latent)."""
    import importlib.util
    import json
    from pathlib import Path

    import yaml

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("prefill_chunk", bench_dir / "prefill_chunk.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny_teacher("qwen3").config.save_pretrained(tmp_path / "config")
    recipes = []
    for target, args in (("gateswa", {"window": 8, "sink": 2, "full_layers": "every:2"}), ("mla", {"kv_lora_rank": 24})):
        (tmp_path / f"{target}.yaml").write_text(yaml.safe_dump({"teacher": "x", "target": target, "target_args": args}))
        recipes.append(str(tmp_path / f"{target}.yaml"))
    out = tmp_path / "prefill.json"
    argv = [str(tmp_path / "config"), *recipes, "--context", "64", "--chunks", "32,0", "--profile", "--device", "cpu", "--json", str(out)]
    assert script.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["chunk"]) for r in rows] == [(m, c) for m in ("teacher", "gateswa", "mla") for c in (32, 0)]
    for r in rows:
        assert r["first_ms"] > 0 and r["ttft_ms"] > 0 and r["peak_gib_over_weights"] is None  # no peak on the CPU
        assert {"attention", "gemm"} <= set(r["profile"]["by_kind"]) and r["profile"]["kernels_per_step"] > 0
    mla = {r["chunk"]: r["profile"]["kernels_per_step"] for r in rows if r["model"] == "mla"}
    assert mla[32] > mla[0]
    for bad, said in (([str(tmp_path / "none.yaml")], "does not exist"), ([*recipes, "--chunks", "8k"], "--chunks: comma-separated")):
        with pytest.raises(SystemExit) as stop:
            script.main([str(tmp_path / "config"), *bad, "--device", "cpu"])
        assert stop.value.code == 2 and said in capsys.readouterr().err.strip().splitlines()[-1]
