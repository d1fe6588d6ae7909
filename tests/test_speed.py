"""The fast paths of training: the fused chunked KD loss, device-side metrics, prefetched batches,
compilation with an eager fallback, and the throughput/memory figures `convert` reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnedit.stages import stage2

# --------------------------------------------------------------------------- the chunked KD loss


def _reference_chunk(h_s, h_t, labels, head_s, head_t, temperature):
    """The implementation stage 2 had before the fused loss (autograd through a checkpointed chunk)."""
    z_s = head_s(h_s)
    with torch.no_grad():
        z_t = head_t(h_t)
    logp_s = F.log_softmax(z_s / temperature, dim=-1)
    logp_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(z_s, labels, ignore_index=-100, reduction="sum")
    ce_t = F.cross_entropy(z_t, labels, ignore_index=-100, reduction="sum")
    return kl, ce, ce_t


def reference_kd_terms(h_s, h_t, ids, head_s, head_t, temperature, chunk):
    hs, ht = h_s.flatten(0, 1), h_t.flatten(0, 1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    kl = ce = ce_t = hs.new_zeros(())
    for s in range(0, hs.shape[0], chunk):
        args = (hs[s : s + chunk], ht[s : s + chunk], labels[s : s + chunk], head_s, head_t, temperature)
        k, c, ct = checkpoint(_reference_chunk, *args, use_reentrant=False)
        kl, ce, ce_t = kl + k, ce + c, ce_t + ct
    n_labels = max(1, int((labels != -100).sum()))
    return kl * temperature**2 / hs.shape[0], ce / n_labels, ce_t / n_labels


def _heads(vocab=37, dim=12, bias=False):
    torch.manual_seed(0)
    head_s = torch.nn.Linear(dim, vocab, bias=bias).double()
    head_t = torch.nn.Linear(dim, vocab, bias=bias).double()
    return head_s, head_t


@pytest.mark.parametrize("temperature,kl_w,ce_w,chunk", [(1.0, 1.0, 0.0, 7), (2.0, 0.7, 0.3, 5), (0.5, 0.0, 1.0, 64)])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_kd_loss_matches_the_reference_values_and_gradients_in_float64(temperature, kl_w, ce_w, chunk, train_head):
    head_s, head_t = _heads(bias=train_head)
    head_s.requires_grad_(train_head)
    head_t.requires_grad_(False)
    h_s = torch.randn(3, 11, 12, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(3, 11, 12, dtype=torch.float64)
    ids = torch.randint(0, 37, (3, 11))
    ids[1, 4] = -100  # an ignored label inside a row, besides every row's last position

    def grads(fn, **kw):
        h_s.grad = None
        head_s.zero_grad(set_to_none=True)
        kl, ce, ce_t = fn(h_s, h_t, ids, head_s, head_t, temperature, chunk, **kw)
        (kl_w * kl + ce_w * ce).backward()
        out = [h_s.grad.clone()] + ([head_s.weight.grad.clone(), head_s.bias.grad.clone()] if train_head else [])
        return (kl.detach(), ce.detach(), ce_t.detach()), out

    values, got = grads(stage2.kd_terms, grads=(kl_w > 0, ce_w > 0))
    ref_values, want = grads(reference_kd_terms)
    for a, b in zip(values, ref_values):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", [(1.7, None), (1.0, 2.5), (0.8, 1.5)])
def test_fused_kd_loss_follows_the_families_logit_transform(transform):
    """Granite divides its logits, Gemma soft-caps them: the fused loss's values and gradients must be those of
    the transformed logits (the reference applies the transform inside autograd)."""
    divisor, cap = transform
    head_s, head_t = _heads(bias=True)
    head_t.requires_grad_(False)

    def capped(head):
        def call(h):
            z = head(h) / divisor
            return torch.tanh(z / cap) * cap if cap else z

        return call

    h_s = torch.randn(3, 11, 12, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(3, 11, 12, dtype=torch.float64)
    ids = torch.randint(0, 37, (3, 11))
    results = []
    for fn, kw in ((stage2.kd_terms, {"transform": transform}), (reference_kd_terms, {})):
        h_s.grad = None
        heads = (head_s, head_t) if kw else (capped(head_s), capped(head_t))
        kl, ce, ce_t = fn(h_s, h_t, ids, *heads, 1.5, 5, **kw)
        (0.6 * kl + 0.4 * ce).backward()
        results.append((kl.detach(), ce.detach(), ce_t.detach(), h_s.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_kd_loss_passes_gradcheck():
    head_s, head_t = _heads(vocab=9, dim=4, bias=True)
    head_t.requires_grad_(False)
    h_t = torch.randn(2, 5, 4, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 5))

    def fn(h_s, w, b):
        head_s.weight.data, head_s.bias.data = w, b  # gradcheck perturbs its own inputs
        kl, ce, _ = stage2._ChunkedKD.apply(
            h_s.flatten(0, 1), w, b, h_t.flatten(0, 1), head_t.weight, None,
            torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten(), 1.5, 3, True, True, stage2.kd_chunk,
        )  # fmt: skip
        return kl, ce

    h_s = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = head_s.weight.detach().clone().requires_grad_(True)
    b = head_s.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (h_s, w, b))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_kd_losss_chunk_math_compiles_as_one_graph_with_the_same_values_and_gradients(temperature):
    """Stage 2 compiles kd_chunk (the element-wise work over chunk x vocab logits) when compilation is on: it
    traces without graph breaks, once per chunk shape, and gives the eager losses and gradients."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    head_s, head_t = (h.float() for h in _heads(vocab=40, dim=8, bias=False))
    h_s, h_t = torch.randn(3, 16, 8, requires_grad=True), torch.randn(3, 16, 8)
    ids = torch.randint(0, 40, (3, 16))
    compiled = torch.compile(stage2.kd_chunk, backend="aot_eager", fullgraph=True)
    results = []
    for math in (stage2.kd_chunk, compiled):
        h_s.grad = head_s.weight.grad = None
        kl, ce, ce_t = stage2.kd_terms(h_s, h_t, ids, head_s, head_t, temperature, 16, chunk_math=math)
        (kl + ce).backward()
        results.append((kl.detach(), ce.detach(), ce_t, h_s.grad.clone(), head_s.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 48 tokens = 3 chunks of one shape


def test_fused_kd_loss_never_keeps_logits_for_the_backward():
    """What autograd saves for the backward is the hidden-state gradient, not chunk x vocab logits."""
    head_s, head_t = _heads(vocab=1000, dim=8)
    head_s.requires_grad_(False)
    h_s = torch.randn(4, 64, 8, dtype=torch.float64, requires_grad=True)
    h_t, ids = torch.randn_like(h_s), torch.randint(0, 1000, (4, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kl, ce, _ = stage2.kd_terms(h_s, h_t, ids, head_s, head_t, 1.0, 32)
    assert max(saved) <= h_s.numel()
    (kl + ce).backward()
    got, h_s.grad = h_s.grad, None  # and what it saved is enough for the right gradient
    ref_kl, ref_ce, _ = reference_kd_terms(h_s, h_t, ids, head_s, head_t, 1.0, 32)
    (ref_kl + ref_ce).backward()
    torch.testing.assert_close(got, h_s.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- compilation

import contextlib  # noqa: E402
import functools  # noqa: E402

from tiny import VOCAB, tiny_ids, tiny_teacher  # noqa: E402

from attnedit.errors import is_out_of_memory  # noqa: E402
from attnedit.recipe import parse_recipe  # noqa: E402
from attnedit.stages import stage1  # noqa: E402
from attnedit.stages.speed import CompileGroup, warm_up  # noqa: E402
from attnedit.surgery import edit_model  # noqa: E402


def _stage1_setup(target, args, family="qwen3"):
    teacher = tiny_teacher(family)
    student = edit_model(teacher, target, args)
    params = stage1.trainable(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    return teacher, student, params


def _loss_and_grads(loss_fn, params, ids):
    for _, p in params:
        p.grad = None
    loss, extras = loss_fn(ids)
    loss.backward()
    return loss.detach(), extras, [p.grad.clone() for _, p in params]


@pytest.mark.slow
@pytest.mark.parametrize("target,args", [("mla", {}), ("gateswa", {"window": 8, "full_layers": "every:2"})])
def test_compiled_stage1_matches_eager_and_compiles_each_layer_kind_once(target, args):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    teacher, student, params = _stage1_setup(target, args)
    ids = tiny_ids(2, 24)
    eager = _loss_and_grads(stage1.make_loss(teacher, student), params, ids)
    group = CompileGroup(True, "test", backend="aot_eager")
    compiled_fn = stage1.make_loss(teacher, student, group)
    warm_up(compiled_fn, [p for _, p in params], 2, 24, VOCAB, torch.device("cpu"), contextlib.nullcontext, group)
    for _ in range(2):
        got = _loss_and_grads(compiled_fn, params, ids)
    assert group.enabled and not group.warned
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1]["layer_rel_err"], eager[1]["layer_rel_err"])
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # 4 edited layers, one graph per layer kind (GateSWA: sliding and full): never one per layer
    assert counters["stats"]["unique_graphs"] == (1 if target == "mla" else 2), dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_teacher_modules_give_the_same_stage1_loss_and_the_undo_restores_them(family):
    """Stage 1 compiles the modules of the teacher's capture forward (attention, norms, MLP): the taps on the
    attention still see every input and output, loss and gradients equal eager, each module class compiles
    once, modules past the last edited layer stay eager, and the undo restores every module."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    teacher, student, params = _stage1_setup("mla", {"layers": [0, 1, 2]}, family)
    ids = tiny_ids(2, 24)
    loss_fn = stage1.make_loss(teacher, student)
    eager = _loss_and_grads(loss_fn, params, ids)
    counters.clear()
    group = CompileGroup(True, "test", backend="aot_eager")
    undo = stage1.compile_teacher_modules(teacher, [0, 1, 2], group)
    layers = list(teacher.model.layers)
    compiled = [m for layer in layers[:3] for m in layer.children()]
    assert all("forward" in vars(m) for m in compiled) and not any("forward" in vars(m) for m in layers[3].children())
    got = _loss_and_grads(loss_fn, params, ids)
    undo()
    assert not any("forward" in vars(m) for m in compiled) and group.enabled and not group.warned
    # one graph per module class: attention, MLP, norm (input and post-attention norms are one class)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1]["layer_rel_err"], eager[1]["layer_rel_err"], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stage1.compile_teacher_modules(teacher, [0], CompileGroup(False, "off"))() is None  # disabled: a no-op


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    teacher, student, params = _stage1_setup("mla", {})
    ids = tiny_ids(2, 16)
    eager = _loss_and_grads(stage1.make_loss(teacher, student), params, ids)
    group = CompileGroup(True, "the stage-1 attentions and the teacher's capture", backend=broken)
    got = _loss_and_grads(stage1.make_loss(teacher, student, group), params, ids)
    assert not group.enabled
    torch.testing.assert_close(got[0], eager[0])
    err = capsys.readouterr().err
    assert err.count("torch.compile of the stage-1 attentions and the teacher's capture failed") == 1 and "running eagerly" in err


def _stage2_setup(family: str):
    """A tiny GateSWA student of ``family`` training its attentions in stage 2 with feature matching: teacher,
    student, trainable params, loss function, ids."""
    teacher = tiny_teacher(family)
    student = edit_model(teacher, "gateswa", {"window": 8, "full_layers": "every:2"})
    params = stage2.trainable(student, "attention")
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    cfg = parse_recipe({"stage2": {"feature_weight": 0.1, "kl_chunk": 16}}).stage2
    return teacher, student, params, stage2.make_loss(teacher, student, cfg), tiny_ids(2, 24)


@pytest.mark.slow
def test_compiled_stage2_layers_match_eager_and_undo_restores_the_model():
    torch._dynamo.reset()
    teacher, student, params, loss_fn, ids = _stage2_setup("llama")
    eager = _loss_and_grads(loss_fn, params, ids)
    from torch._dynamo.utils import counters

    counters.clear()
    group = CompileGroup(True, "test", backend="aot_eager")
    undo = stage2.compile_layers(student, group)
    assert "_layer" in vars(student)
    warm_up(loss_fn, [p for _, p in params], 2, 24, VOCAB, torch.device("cpu"), contextlib.nullcontext, group)
    got = _loss_and_grads(loss_fn, params, ids)
    undo()
    assert "_layer" not in vars(student) and group.enabled
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # sliding and full layers
    torch.testing.assert_close(got[0], eager[0])
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _saved_bytes(loss_fn, params, ids) -> int:
    """Bytes of activations the autograd graph keeps for the backward (parameters left out)."""
    total = 0

    def pack(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(ids)
    torch.autograd.grad(loss, [p for _, p in params])
    return total


GATESWA = {"window": 8, "full_layers": "every:2"}


def _qwen3_stage2(target: str, args: dict):
    """A tiny Qwen3 student of ``target`` training its attentions in stage 2 with feature matching: student,
    trainable params, loss function."""
    teacher = tiny_teacher("qwen3")
    student = edit_model(teacher, target, args)
    params = stage2.trainable(student, "attention")
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    loss_fn = stage2.make_loss(teacher, student, parse_recipe({"stage2": {"feature_weight": 0.1, "kl_chunk": 16}}).stage2)
    return student, params, loss_fn


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("target,args", [("mla", {}), ("gateswa", GATESWA)])
def test_compiled_stage2_layers_under_gradient_checkpointing_match_eager_and_stay_compiled(target, args, backend, capsys):
    """Stage 2 as both Qwen3-8B recipes run it on one 80 GB card: compiled decoder layers with gradient
    checkpointing. The checkpoint runs inside each compiled layer's graph: around a compiled call, its early
    stop raised through the call turned compilation off mid-recomputation ("target_frame.early_stop is set"),
    and the recomputation could run another graph than the forward's (saved tensors that do not match). Loss and
    gradients equal eager's, compilation stays on, and the graph keeps fewer activations than without checkpointing
    and about as many as the eager checkpoint, which the memory plan models."""
    torch._dynamo.reset()
    student, params, loss_fn = _qwen3_stage2(target, args)
    ids = tiny_ids(2, 24)
    eager = _loss_and_grads(loss_fn, params, ids)
    student.gradient_checkpointing, student.training = True, True
    kept_eager_checkpointed = _saved_bytes(loss_fn, params, ids)  # what the memory plan's checkpointing term models
    student.gradient_checkpointing, student.training = False, False
    group = CompileGroup(True, "the stage-2 decoder layers", backend=backend)
    undo = stage2.compile_layers(student, group)
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        student.gradient_checkpointing, student.training = True, True  # as Stage2.train_mode sets them
        got = [_loss_and_grads(loss_fn, params, ids) for _ in range(2)][-1]
        # one graph per layer kind (MLA: one; GateSWA: sliding and full), never one per layer
        assert counters["stats"]["unique_graphs"] == (1 if target == "mla" else 2), dict(counters["stats"])
        kept_checkpointed = _saved_bytes(loss_fn, params, ids)
        student.gradient_checkpointing, student.training = False, False
        kept_plain = _saved_bytes(loss_fn, params, ids)
        # the first layer alone recomputed (convert's fit where the card holds the rest): both compiled forms in one pass
        student.gradient_checkpointing, student.training, student.checkpointed_layers = True, True, 1
        partial = _loss_and_grads(loss_fn, params, ids)
        kept_partial = _saved_bytes(loss_fn, params, ids)
    finally:
        student.gradient_checkpointing, student.training, student.checkpointed_layers = False, False, None
        undo()
    torch.testing.assert_close(partial[0], eager[0])
    for a, b in zip(partial[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert kept_checkpointed < kept_partial < kept_plain, (kept_checkpointed, kept_partial, kept_plain)
    assert "_checkpointed_layer" not in vars(student) and "_layer" not in vars(student)
    assert group.enabled and not group.warned, capsys.readouterr().err
    torch.testing.assert_close(got[0], eager[0])
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert kept_checkpointed < 0.6 * kept_plain, (kept_checkpointed, kept_plain)
    # the checkpoint inside the graph keeps about what the eager checkpoint keeps (each layer's input), so the plan holds
    assert kept_checkpointed <= 1.15 * kept_eager_checkpointed, (kept_checkpointed, kept_eager_checkpointed)


def _kept_bytes(fn):
    """``fn()`` and the bytes of the distinct tensors (by storage) its autograd graph keeps for the backward,
    parameters left out: what stays in memory until the backward, each tensor once."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_the_feature_loss_keeps_only_the_hidden_states_it_compares():
    """The cosine in float32 would keep its float32 copies and normalised states for the backward, twice the bytes
    of the two bf16 states it compares (6.3 GiB more at Qwen3-8B's stage-2 shape): the loss keeps the two states
    it was given, and its value and gradients are the plain cosine's."""
    torch.manual_seed(0)
    s = [torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 16, 64, dtype=torch.bfloat16) for _ in range(3)]
    loss, kept = _kept_bytes(lambda: stage2.feature_loss(s, t))
    assert kept == sum(x.numel() * x.element_size() for x in s + t)
    loss.backward()
    leaves = [x.detach().clone().requires_grad_() for x in s]
    want = sum((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean() for a, b in zip(leaves, t))
    want.backward()
    torch.testing.assert_close(loss, want)
    for a, b in zip(s, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_the_memory_plans_feature_term_covers_what_feature_matching_keeps_in_bf16():
    """Stage 2 of a bf16 Qwen3 student with gradient checkpointing: what turning feature matching on adds to the
    kept tensors is at most the plan's hidden-state term with it (the run at Qwen3-8B's shape peaked 5.7 GiB over
    the plan when the cosine kept float32 copies)."""
    from attnedit.stages.stage2 import Stage2

    teacher = tiny_teacher("qwen3").to(torch.bfloat16)
    student = edit_model(teacher, "mla", {}).to(torch.bfloat16)
    params = stage2.trainable(student, "attention")
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    student.gradient_checkpointing, student.training = True, True
    ids, c = tiny_ids(2, 24), teacher.config
    kept, planned = {}, {}
    for weight in (0.0, 0.1):
        recipe = parse_recipe({"teacher": "x", "target": "mla", "stage2": {"batch_size": 2, "seq_len": 24, "feature_weight": weight, "kl_chunk": 16}})
        loss_fn = stage2.make_loss(teacher, student, recipe.stage2)
        _, kept[weight] = _kept_bytes(functools.partial(loss_fn, ids))
        planned[weight] = Stage2(recipe.stage2, recipe.data, recipe.seed).activation_bytes(c, student.config, 2, c.num_hidden_layers, torch.device("cpu"), 2)
    one_state = ids.numel() * c.hidden_size * 2  # the teacher's final state, which the plan counts either way
    assert 0 < kept[0.1] - kept[0.0] <= planned[0.1] - planned[0.0] + one_state, (kept, planned)


def test_recomputing_only_the_first_layers_gives_the_same_loss_and_gradients_and_keeps_between_none_and_all():
    """``checkpointed_layers = n``: the first n decoder layers are recomputed in the backward, the rest keep their
    activations. Loss and gradients are those of no checkpointing and of every layer checkpointed, and what the
    graph keeps for the backward falls with each layer recomputed; so does the memory plan's figure."""
    from attnedit.stages.stage2 import Stage2

    teacher, student, params, loss_fn, ids = _stage2_setup("qwen3")
    layers = teacher.config.num_hidden_layers
    assert layers >= 3
    plain = _loss_and_grads(loss_fn, params, ids)
    kept, planned = [], []
    recipe = parse_recipe({"teacher": "x", "target": "gateswa", "stage2": {"batch_size": 2, "seq_len": 24, "feature_weight": 0.1, "kl_chunk": 16}})
    stage = Stage2(recipe.stage2, recipe.data, recipe.seed)
    try:
        for n in range(layers + 1):
            student.gradient_checkpointing, student.training, student.checkpointed_layers = n > 0, n > 0, n
            got = _loss_and_grads(loss_fn, params, ids)
            torch.testing.assert_close(got[0], plain[0])
            for a, b in zip(got[2], plain[2]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            kept.append(_kept_bytes(functools.partial(loss_fn, ids))[1])
            planned.append(stage.activation_bytes(teacher.config, student.config, 2, n, torch.device("cpu"), 4))
    finally:
        student.gradient_checkpointing, student.training, student.checkpointed_layers = False, False, None
    assert all(a > b for a, b in zip(kept, kept[1:])), kept  # each layer more recomputed keeps less
    # the plan's peak falls too, up to the last layer: recomputing it as well only trades its internals for the one
    # recomputed layer's, which the peak holds either way
    assert all(a > b for a, b in zip(planned[:-1], planned[1:-1])) and planned[-1] < planned[0], planned
    student.gradient_checkpointing, student.training = True, True  # None: every layer, as before
    try:
        assert _kept_bytes(functools.partial(loss_fn, ids))[1] == kept[-1]
    finally:
        student.gradient_checkpointing, student.training = False, False


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The CUDA path of a sliding layer (FlexAttention with a block mask) taken on the CPU, its compiled kernel
    counted: FlexAttention compiles with ``aot_eager`` here (its dense form; CPU FlexAttention refuses a backward,
    which the dense form computes, so that check is lifted). The caches start empty, as at a new shape. Returns the
    list that gets one entry per run of the compiled FlexAttention graph."""
    import torch.nn.attention.flex_attention as fa

    from attnedit.targets import common, kernels

    runs = []

    def counted(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        boxed = lambda g, _: make_boxed_func(g)  # noqa: E731
        compiled = aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)

        def run(*args):
            runs.append(1)
            return compiled(*args)

        return run

    monkeypatch.setattr(kernels, "_fast_device", lambda device: True)
    monkeypatch.setattr(kernels, "_FLEX", torch.compile(fa.flex_attention, backend=counted))
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(kernels, "_BLOCK_MASKS", {})
    monkeypatch.setattr(common, "_ROPE_TABLES", {})
    torch._dynamo.reset()
    yield runs
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_checkpointed_sliding_layers_keep_flexattention_in_their_graph(flex_on_cpu):
    """Stage 2 of a GateSWA recipe on a GPU: compiled layers, gradient checkpointing inside them, FlexAttention in the
    sliding layers, at a sequence length no earlier forward used. Building the block mask (or the RoPE table) inside
    the traced checkpoint wrote a module-level cache, a side effect dynamo refuses in a checkpoint; it then ran the
    checkpoint eagerly, where FlexAttention is unfused ([T, T] scores: out of memory on a Qwen3-8B at 2 x 8192).
    The model builds them before its layers run: no graph break, one graph per layer kind, the same loss and
    gradients as the eager model."""
    student, params, loss_fn = _qwen3_stage2("gateswa", GATESWA)
    ids = tiny_ids(2, 24)
    group = CompileGroup(True, "the stage-2 decoder layers", backend="aot_eager")
    undo = stage2.compile_layers(student, group)
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        student.gradient_checkpointing, student.training = True, True
        got = _loss_and_grads(loss_fn, params, ids)
        breaks = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        student.gradient_checkpointing, student.training = False, False
        undo()
    assert not breaks, breaks
    assert graphs == 2, graphs  # the sliding and the full layer, FlexAttention inside the sliding one's
    assert group.enabled and not group.warned
    eager = _loss_and_grads(loss_fn, params, ids)
    torch.testing.assert_close(got[0], eager[0])
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_eager_gradient_checkpointing_keeps_flexattention_compiled(flex_on_cpu):
    """The layers eager (stage 2 without compilation, or after it failed) under gradient checkpointing: torch 2.11's
    ``torch.utils.checkpoint`` (the GPU run's) turns TorchDynamo off inside, so the compiled FlexAttention ran
    unfused there (later torch versions run it compiled either way). The model's checkpoint keeps it compiled, in the
    forward and in the recomputation; loss and gradients as without checkpointing."""
    student, params, loss_fn = _qwen3_stage2("gateswa", GATESWA)
    sliding = sum(a.window is not None for a in student.attentions())
    ids = tiny_ids(2, 24)
    plain = _loss_and_grads(loss_fn, params, ids)
    flex_on_cpu.clear()
    student.gradient_checkpointing, student.training = True, True
    try:
        got = _loss_and_grads(loss_fn, params, ids)
    finally:
        student.gradient_checkpointing, student.training = False, False
    assert len(flex_on_cpu) == 2 * sliding, (len(flex_on_cpu), sliding)  # each sliding layer: forward, recomputation
    torch.testing.assert_close(got[0], plain[0])
    for a, b in zip(got[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_stage1_sliding_attentions_find_their_block_masks_built(flex_on_cpu):
    """Stage 1 runs each edited attention compiled, outside the model's forward: the block masks are built before
    (and kept), not inside each compiled call, where they would be built again every step."""
    from attnedit.targets import kernels

    teacher, student, params = _stage1_setup("gateswa", GATESWA)
    group = CompileGroup(True, "the stage-1 attentions", backend="aot_eager")
    loss_fn = stage1.make_loss(teacher, student, group)
    from torch._dynamo.utils import counters

    counters.clear()
    got = _loss_and_grads(loss_fn, params, tiny_ids(2, 24))
    assert not dict(counters["graph_break"]) and group.enabled
    assert (24, 8, 4) in {key[:3] for key in kernels._BLOCK_MASKS}, list(kernels._BLOCK_MASKS)  # t, window, default sink
    eager = _loss_and_grads(stage1.make_loss(teacher, student), params, tiny_ids(2, 24))
    torch.testing.assert_close(got[0], eager[0])


def test_running_out_of_memory_in_a_compiled_call_is_raised_and_keeps_compilation_on(capsys):
    """Out of memory in a compiled call (here the compiler's, which dynamo wraps as BackendCompilerFailed) is not a
    compiler failure: eagerly the call would need more memory, so it is raised, and the group stays compiled."""

    def starved(gm, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")

    torch._dynamo.reset()
    group = CompileGroup(True, "test", backend=starved)
    call = group.wrap(nn.Linear(4, 4))
    with pytest.raises(Exception) as e:
        call(torch.randn(2, 4))
    assert is_out_of_memory(e.value), repr(e.value)
    assert group.enabled and not group.warned and capsys.readouterr().err == ""


# --------------------------------------------------------------------------- no host syncs in the losses


def test_loss_functions_read_nothing_back_to_the_host(monkeypatch):
    """Stage 1 and stage 2 losses (teacher forward excluded) never call .item()/float()/tolist()/bool()."""
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "mla")
    cfg = parse_recipe({"stage2": {"ce_weight": 0.5, "feature_weight": 0.1, "kl_chunk": 16}}).stage2
    fns = [stage1.make_loss(teacher, student), stage2.make_loss(teacher, student, cfg)]
    ids = tiny_ids(2, 24)
    xs = stage1.capture(teacher, student.config.edit["edited_layers"], ids)  # the teacher runs before the patch
    th = stage2.teacher_hidden(teacher, ids, True)
    monkeypatch.setattr(stage1, "capture", lambda *a: xs)
    monkeypatch.setattr(stage2, "teacher_hidden", lambda *a: th)

    def sync(*a, **k):
        raise AssertionError("host sync in the loss")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for fn in fns:
        loss, extras = fn(ids)
        assert all(isinstance(v, torch.Tensor) for v in extras.values())
        loss.backward()


# --------------------------------------------------------------------------- batches drawn ahead


def test_device_batches_are_the_streams_batches_and_save_the_next_batchs_position(tmp_path):
    from test_stages import char_tokenizer, make_docs

    from attnedit.data import BlockStream, DataConfig, DeviceBatches

    cfg = DataConfig(files=[str(make_docs(tmp_path / "docs.jsonl"))], seq_len=16, heldout_blocks=2, shuffle_buffer=8)
    tok = char_tokenizer()
    plain = BlockStream(cfg, tok, seed=1)
    ahead = DeviceBatches(BlockStream(cfg, tok, seed=1), "cpu")
    for k in range(7):  # across chunk boundaries (8 blocks per chunk, 3 per batch)
        assert torch.equal(ahead.next_batch(3), plain.next_batch(3)), k
        assert ahead.state_dict() == plain.state_dict(), k  # not the position after the batch drawn ahead
    state = ahead.state_dict()
    want = [plain.next_batch(3) for _ in range(4)]
    resumed = DeviceBatches(BlockStream(cfg, tok, seed=1), "cpu")
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(3), w) for w in want)
    ahead.load_state_dict(state)  # also with a batch pending
    assert all(torch.equal(ahead.next_batch(3), w) for w in want)
    assert torch.equal(ahead.next_batch(5), plain.next_batch(5))  # another batch size rewinds the one drawn ahead
    ahead.close()
    resumed.close()


# --------------------------------------------------------------------------- what convert reports


def test_convert_reports_speed_against_the_teachers_forward_and_memory(tmp_path, capsys):
    import json

    from test_stages import make_docs, make_teacher_dir, metrics, tiny_raw

    from attnedit.stages import convert, format_summary
    from attnedit.stages.plan import estimated_memory

    raw = tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), stage1__steps=4, stage2__steps=4, log_every=2)
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="lines")
    err = capsys.readouterr().err
    assert "teacher plain forward at stage 1's batch (4 x 32)" in err and "x teacher fwd" in err
    for stage in (1, 2):
        info = summary[f"stage{stage}"]
        assert info["tok_s"] > 0 and info["teacher_fwd_tok_s"] > 0
        assert info["ratio"] == pytest.approx(info["tok_s"] / info["teacher_fwd_tok_s"], rel=1e-2)
        assert info["peak_memory_bytes"] is None and info["compiled"] is False
        assert info["est_memory_bytes"] == estimated_memory(parse_recipe(raw), stage)  # the dry-run plan's estimate
    rows = [r for r in metrics(tmp_path / "run") if "step" in r]
    assert all({"tok_s", "teacher_fwd_tok_s", "ratio"} <= set(r) for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stage2"]["ratio"] == summary["stage2"]["ratio"]
    assert "x the teacher's forward" in format_summary(summary)


def test_teacher_baseline_is_the_median_batch_after_warm_up(monkeypatch):
    """Two slow warm-up batches and one slow timed batch do not move the baseline: the median batch sets it."""
    import contextlib
    import types

    from attnedit.stages import speed

    clock = iter([0.0, 1.0, 2.0, 6.0, 6.0, 6.5, 6.5, 7.0])  # two warm-ups (untimed), then batches of 4, 0.5, 0.5 s
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(clock))
    calls = []

    class Teacher:
        config = types.SimpleNamespace(vocab_size=10)

        def __call__(self, input_ids, use_cache):
            calls.append(input_ids.shape)

    rate = speed.teacher_forward_tok_s(Teacher(), 2, 8, torch.device("cpu"), contextlib.nullcontext, batches=3)
    assert len(calls) == 5 and rate == 2 * 8 / 0.5


def test_profile_steps_profiles_each_stage_next_to_the_teacher_and_leaves_the_result_unchanged(tmp_path):
    """profile_steps: after each stage, profiled extra steps and a teacher forward of the same shape land in
    profile-stage<N>.json and summary.json; the weights are restored, so the saved model equals an unprofiled run's."""
    import json

    from safetensors.torch import load_file
    from test_stages import make_docs, make_teacher_dir, tiny_raw

    from attnedit.stages import convert

    teacher, docs = make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl")
    raw = dict(tiny_raw(teacher, docs, stage1__steps=2, stage2__steps=2, log_every=1), baseline_batches=1)
    convert(parse_recipe(raw), tmp_path / "plain", progress="none")
    summary = convert(parse_recipe(dict(raw, profile_steps=2)), tmp_path / "profiled", progress="none")
    for stage in (1, 2):
        prof = json.loads((tmp_path / "profiled" / f"profile-stage{stage}.json").read_text())
        assert prof["steps"] == 2 and prof["student_step"]["kernels_per_step"] > 10
        assert prof["teacher_forward"]["device_ms_per_step"] > 0 and prof["device_ratio"] > 0
        info = summary[f"stage{stage}"]["profile"]
        assert info["student_step_device_ms"] == prof["student_step"]["device_ms_per_step"]
        assert info["device_ratio"] == prof["device_ratio"] and info["teacher_by_kind_ms"]
        assert not (tmp_path / "plain" / f"profile-stage{stage}.json").exists()
    # more steps than an unprofiled run took, yet the same weights: the profiled steps were undone
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "profiled" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_profile_warns_and_the_conversion_goes_on(tmp_path, monkeypatch, capsys):
    """Profiling is a measurement: if it fails (out of memory, the profiler), the stage's training stands."""
    import importlib

    from test_stages import make_docs, make_teacher_dir, tiny_raw

    from attnedit.stages import convert

    convert_module = importlib.import_module("attnedit.stages.convert")

    def broken(run, job, opt):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore lines")

    monkeypatch.setattr(convert_module, "profile_stage", broken)
    raw = dict(tiny_raw(make_teacher_dir(tmp_path), make_docs(tmp_path / "docs.jsonl"), stage1__steps=1, stage2__steps=1), profile_steps=1)
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    err = capsys.readouterr().err
    assert err.count("warning: profiling stage") == 2 and "CUPTI_ERROR_NOT_INITIALIZED" in err and "more lines" not in err
    assert "profile" not in summary["stage1"] and (tmp_path / "run" / "model" / "config.json").exists()
    assert not list((tmp_path / "run").glob("profile-stage*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_teacher_layers_give_the_same_stage2_loss_with_the_feature_hooks_and_undo(family):
    """Stage 2 compiles the teacher's decoder layers too: one graph for all of them, the feature loss's
    hooks on the layers still see every output, loss and gradients equal eager, and the undo restores them."""
    torch._dynamo.reset()
    teacher, student, params, loss_fn, ids = _stage2_setup(family)
    eager = _loss_and_grads(loss_fn, params, ids)
    from torch._dynamo.utils import counters

    counters.clear()
    group = CompileGroup(True, "test", backend="aot_eager")
    undo = stage2.compile_teacher_layers(teacher, group)
    layers = list(teacher.model.layers)
    assert all("forward" in vars(layer) for layer in layers)
    got = _loss_and_grads(loss_fn, params, ids)
    undo()
    assert not any("forward" in vars(layer) for layer in layers) and group.enabled
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # every teacher layer: one graph
    for a, b in zip(got, eager):
        if isinstance(a, list):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target,args", [("mla", {"kv_lora_rank": 16, "qk_rope_head_dim": 8}), ("gateswa", {"window": 8})])
def test_stage2_memory_estimate_counts_the_mla_heads_kv_up_projection(target, args):
    """MLA saves every head's up-projected K (no-RoPE part) and V for stage 2's backward where the teacher keeps
    grouped K and V: the estimate adds exactly that width per token and edited layer (H100: without it, MLA's
    stage 2 at 16 x 2048 peaked 4% above the estimate); GateSWA adds nothing."""
    from attnedit.stages.stage2 import Stage2, attention_extra_width
    from attnedit.surgery import edited_config
    from attnedit.targets import AttnEditForCausalLM

    teacher = tiny_teacher("qwen3")
    edited = edited_config(teacher.config, target, args)
    with torch.device("meta"):
        meta = AttnEditForCausalLM(edited)
    layers = edited.edit["edited_layers"]
    width = sum(attention_extra_width(edited))
    c = teacher.config
    if target == "mla":
        up = meta.model.layers[0].self_attn.kv_b_proj.out_features
        assert up == c.num_attention_heads * (meta.model.layers[0].self_attn.qk_nope_head_dim + meta.model.layers[0].self_attn.v_head_dim)
        assert width == len(layers) * (up - 2 * c.num_key_value_heads * c.head_dim) > 0
    else:
        assert width == 0
    recipe = parse_recipe({"teacher": "x", "target": target, "stage2": {"batch_size": 2, "seq_len": 16}})
    stage = Stage2(recipe.stage2, recipe.data, recipe.seed)
    with pytest.MonkeyPatch.context() as m:  # the same estimate without the extra width
        m.setattr(stage2, "attention_extra_width", lambda edited: [])
        base = stage.activation_bytes(c, edited, 2, False, torch.device("cuda"), 2)
    assert stage.activation_bytes(c, edited, 2, False, torch.device("cuda"), 2) - base == 2 * 16 * width * 2


def test_the_profiles_teacher_forward_is_eager_while_the_stage_runs_its_modules_compiled():
    """profile_stage compares the student's step with the teacher's plain forward: eager, as the tok/s baseline
    is, even while stage 1 (or 2) runs the teacher's modules compiled; the group is enabled again afterwards."""
    from attnedit.stages.convert import plain_forward

    torch._dynamo.reset()
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    teacher = tiny_teacher("llama")
    group = CompileGroup(True, "test", backend=backend)
    undo = stage1.compile_teacher_modules(teacher, [0, 1], group)
    ids = tiny_ids(2, 16)
    with torch.no_grad():
        eager = teacher(input_ids=ids, use_cache=False).logits
        assert compiled  # the teacher's modules do run compiled in the stage ...
        n = len(compiled)
        torch._dynamo.reset()
        got = plain_forward(teacher, ids, group).logits
    assert len(compiled) == n and group.enabled  # ... but not in the plain forward, and the group is back on
    torch.testing.assert_close(got, eager)
    undo()


def test_each_stage_says_its_speed_and_peak_when_it_ends():
    """convert's line at a stage's end (kept in the log even when a later stage fails)."""
    from attnedit.stages.format import stage_done_text

    info = {"tok_s": 19415.2, "ratio": 0.6625, "peak_memory_bytes": 70 * 2**30, "est_memory_bytes": 68 * 2**30, "compiled": True}
    assert stage_done_text(1, info) == "stage 1 done, 19,415 tok/s (0.66x the teacher's forward), peak 70.0 GiB (plan 68.0 GiB), compiled"
    assert stage_done_text(2, {"tok_s": 10.0, "compiled": False}) == "stage 2 done, 10 tok/s, eager"  # CPU: no peak, no baseline
