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
