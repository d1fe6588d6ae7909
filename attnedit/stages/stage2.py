"""Stage 2: model-level distillation.

Loss = ``kl_weight * T^2 KL(p_T^(1/T) || p_S^(1/T))`` on every position's next-token distribution
``+ ce_weight * CE`` on the data ``+ feature_weight * sum_l (1 - cos(h_S,l, h_T,l))`` on hidden states.

The student shares its frozen weights with the teacher. The loss never materialises full-vocabulary
logits for the whole batch: the LM head and softmaxes run over ``kl_chunk`` tokens at a time, and each
chunk's gradient w.r.t. the student's final hidden states is computed right there (:class:`_ChunkedKD`),
so the backward pass neither keeps logits nor runs the LM heads again. :class:`Stage2` is the stage as the
conversion runs it (``base.Stage``).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed.memory import FP32, score_bytes
from ..families import family_for
from ..families.hooks import watch
from ..targets.common import checkpoint
from .base import Conversion, Stage
from .speed import CompileGroup, compile_forwards, layer_context
from .stage1 import trainable as attention_trainable

# Activation memory, in tensors per token kept for backward; LAYER_SAVED and MLP_SAVED checked against
# measured peaks on an H100: SmolLM2 -> MLA stage 2 at 8 x 2048 peaked at 11.1 GiB. An MLA layer keeps
# more: see attention_extra_width (at 16 x 2048, 21.35 GiB measured against 20.54 without it).
LAYER_SAVED = 10  # hidden-sized tensors a decoder layer saves for backward (norms, q/k/v/o, residuals)
MLP_SAVED = 3  # intermediate-sized tensors of its MLP (gate, up, activation, product; one is recomputed)
KD_VOCAB_TENSORS = 5  # vocabulary-sized fp32 tensors per KD chunk (two logits, two softmaxes, gradient)
MLP_RATIO = 4  # intermediate / hidden size when the config does not say


@torch.no_grad()
def teacher_hidden(teacher, ids: torch.Tensor, all_layers: bool) -> list[torch.Tensor]:
    """The teacher's outputs of layers 0..L-2 (if ``all_layers``) and its final normed hidden state.

    The same layout as the student's ``hidden_states[1:]``, so features pair up index by index.
    """
    n = teacher.config.num_hidden_layers
    layers = list(range(n - 1)) if all_layers else []
    found: dict[int, torch.Tensor] = {}
    family = family_for(teacher.config)
    with watch({i: family.layers(teacher)[i] for i in layers}, on_output=found.__setitem__):
        final = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    return [found[i] for i in layers] + [final]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM-head matmuls run in: autocast's where it is on, else the weight's."""
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def logit_transform(model) -> tuple[float, float | None]:
    """The teacher family's logit post-processing, as the edited model applies it (``scale_logits``): a divisor
    (Granite's ``logits_scaling``) and a soft cap (Gemma's ``final_logit_softcapping``); (1.0, None) for most."""
    backbone = getattr(model.config, "backbone", None) or {}
    return float(backbone.get("logits_scaling", 1.0)), backbone.get("final_logit_softcapping")


def _transformed(z: torch.Tensor, transform) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits after :func:`logit_transform`'s ``(divisor, cap)`` and the derivative of the result w.r.t. ``z``."""
    divisor, cap = transform
    z = z / divisor if divisor != 1.0 else z
    if not cap:
        return z, None if divisor == 1.0 else torch.full((), 1.0 / divisor, dtype=z.dtype, device=z.device)
    t = torch.tanh(z / cap)
    return t * cap, (1 - t * t) / divisor


def kd_chunk(
    hs,
    ht,
    weight,
    bias,
    weight_t,
    bias_t,
    labels,
    valid,
    n_labels,
    temperature: float,
    n: int,
    acc: torch.dtype,
    out_dtype: torch.dtype,
    want_ce: bool,
    want_kl: bool,
    transform=(1.0, None),
):
    """One chunk of the KD loss from its hidden states: the student and teacher logits over the LM heads, the
    KL, student-CE and teacher-CE sums (``acc`` dtype) and the gradients of the mean KL (``T (p_s - p_t) / n``)
    and mean CE w.r.t. the student logits (``out_dtype``; None when not wanted). Besides the two LM-head
    matmuls, element-wise work over ``chunk x vocab``: ``torch.compile`` fuses it into a few kernels (on the
    GPU, stage 2's ``compile`` setting), where eager PyTorch makes a dozen passes over the logits.
    ``transform``: :func:`logit_transform`'s post-processing of both models' logits (the gradients go through it)."""
    T = temperature
    z_s = F.linear(hs, weight, bias).to(acc)  # the compute-dtype logits are dropped here: one fp32 copy each
    z_t = F.linear(ht, weight_t, bias_t).to(acc)
    deriv = None
    if transform[0] != 1.0 or transform[1]:
        z_s, deriv = _transformed(z_s, transform)
        z_t, _ = _transformed(z_t, transform)
    rows = labels.clamp_min(0)[:, None]
    lse_s = torch.logsumexp(z_s, -1)
    ce = ((lse_s - z_s.gather(1, rows)[:, 0]) * valid).sum()
    ce_t = ((torch.logsumexp(z_t, -1) - z_t.gather(1, rows)[:, 0]) * valid).sum()
    logp_s = F.log_softmax(z_s / T if T != 1.0 else z_s, dim=-1)
    logp_t = F.log_softmax(z_t / T if T != 1.0 else z_t, dim=-1)
    del z_t
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum")
    dz_ce = dz_kl = None
    if want_ce:
        g = (z_s - lse_s[:, None]).exp_()  # softmax(z_s), in place as the eager path's memory plan assumes
        g.scatter_add_(1, rows, torch.full_like(rows, -1, dtype=g.dtype))
        g.mul_((valid.to(acc) / n_labels)[:, None])
        dz_ce = (g.mul_(deriv) if deriv is not None else g).to(out_dtype)
    del z_s
    if want_kl:
        dz_kl = logp_s.exp_().sub_(logp_t.exp_()).mul_(T / n)
        dz_kl = (dz_kl.mul_(deriv) if deriv is not None else dz_kl).to(out_dtype)
    return kl, ce, ce_t, dz_ce, dz_kl


class _ChunkedKD(torch.autograd.Function):
    """KL/CE over the LM head, chunk by chunk, with the gradients computed in the forward pass.

    Per chunk of tokens it computes the student logits, the teacher log-probs (no grad), the KL, student
    CE and teacher CE sums and, for the terms that need it, the gradient of each term w.r.t. the student
    hidden states (``dKL/dz = T (p_s - p_t) / N``, ``dCE/dz = (softmax(z_s) - onehot) / n_labels``, times
    the head's weight) and w.r.t. the head's weight and bias when they train. The backward only scales
    them by the incoming gradients: no logits are kept or recomputed, and the teacher's LM head runs once.
    Nothing here reads a value back to the host.
    """

    @staticmethod
    def forward(ctx, h_s, weight, bias, h_t, weight_t, bias_t, labels, temperature, chunk, grad_kl, grad_ce, chunk_math, transform=(1.0, None)):
        n, T = h_s.shape[0], float(temperature)
        valid = labels != -100
        n_labels = valid.sum().clamp_min(1)
        acc = torch.promote_types(weight.dtype, torch.float32)  # logits and sums in fp32 (fp64 stays fp64)
        cdt = _compute_dtype(weight)
        grads = {"kl": grad_kl, "ce": grad_ce}
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        g_h = {k: h_s.new_zeros(h_s.shape, dtype=acc) for k, on in grads.items() if on and want_h}
        g_w = {k: torch.zeros(weight.shape, dtype=acc, device=weight.device) for k, on in grads.items() if on and want_w}
        g_b = {k: torch.zeros(bias.shape, dtype=acc, device=bias.device) for k, on in grads.items() if on and want_b}
        kl = h_s.new_zeros((), dtype=acc)
        ce, ce_t = kl.clone(), kl.clone()
        for s in range(0, n, chunk):
            hs, ht = h_s[s : s + chunk], h_t[s : s + chunk]
            kl_c, ce_c, ce_t_c, dz_ce, dz_kl = chunk_math(
                hs, ht, weight, bias, weight_t, bias_t, labels[s : s + chunk], valid[s : s + chunk], n_labels, T, n,
                acc, cdt, "ce" in g_h or "ce" in g_w or "ce" in g_b, "kl" in g_h or "kl" in g_w or "kl" in g_b, transform,
            )  # fmt: skip
            kl, ce, ce_t = kl + kl_c, ce + ce_c, ce_t + ce_t_c
            for k, g in (("ce", dz_ce), ("kl", dz_kl)):
                if g is None:
                    continue
                if k in g_h:
                    g_h[k][s : s + chunk] = torch.matmul(g, weight.to(cdt))
                if k in g_w:
                    g_w[k] += torch.matmul(g.t(), hs.to(cdt))
                if k in g_b:
                    g_b[k] += g.sum(0)
        kl = kl * (T * T / n)
        ce, ce_t = ce / n_labels, ce_t / n_labels
        ctx.keys = [(k, name) for name, d in (("h", g_h), ("w", g_w), ("b", g_b)) for k in d]
        ctx.save_for_backward(*[d[k] for name, d in (("h", g_h), ("w", g_w), ("b", g_b)) for k in d])
        ctx.dtypes = (h_s.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*[t for t, on in ((kl, grad_kl), (ce, grad_ce), (ce_t, False)) if not on])
        return kl, ce, ce_t

    @staticmethod
    def backward(ctx, d_kl, d_ce, d_ce_t):
        scale = {"kl": d_kl, "ce": d_ce}
        out = {"h": None, "w": None, "b": None}
        for (k, name), g in zip(ctx.keys, ctx.saved_tensors):
            term = g * scale[k]
            out[name] = term if out[name] is None else out[name] + term
        dt_h, dt_w, dt_b = ctx.dtypes
        cast = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
        return cast(out["h"], dt_h), cast(out["w"], dt_w), cast(out["b"], dt_b), *([None] * 10)


def kd_terms(
    h_s,
    h_t,
    ids,
    head_s,
    head_t,
    temperature: float,
    chunk: int,
    grads: tuple[bool, bool] = (True, True),
    chunk_math=kd_chunk,
    transform=(1.0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``T^2 KL`` per token, mean student CE and mean teacher CE over the next tokens, chunk by chunk.

    All three are device tensors (nothing is read back to the host). ``grads`` says which of KL and
    student CE can be back-propagated; one that cannot is returned as a constant. ``chunk_math`` is
    :func:`kd_chunk` or its compiled form.
    """
    hs, ht = h_s.flatten(0, 1), h_t.flatten(0, 1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    grad_kl, grad_ce = (g and torch.is_grad_enabled() for g in grads)
    return _ChunkedKD.apply(
        hs, head_s.weight, head_s.bias, ht.detach(), head_t.weight.detach(),
        None if head_t.bias is None else head_t.bias.detach(), labels, temperature, chunk, grad_kl, grad_ce, chunk_math, transform,
    )  # fmt: skip


def cosine_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean_tokens (1 - cos(s, t))``, computed in float32."""
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()


def feature_loss(student_hidden: list, teacher_hidden_: list) -> torch.Tensor:
    """``sum_l mean_tokens (1 - cos(h_S,l, h_T,l))``. Each layer's term is checkpointed: its backward keeps the
    two hidden states it was given (the student's is the next layer's input, which the model keeps anyway; the
    teacher's is in the memory plan), not the float32 copies and normalised states the cosine saves: about 3 bf16
    hidden states a token and layer more, 6.3 GiB at Qwen3-8B's 36 layers and 2 x 4096 tokens."""
    terms = [checkpoint(cosine_distance, s, t) if s.requires_grad else cosine_distance(s, t) for s, t in zip(student_hidden, teacher_hidden_)]
    return torch.stack(terms).sum()


def make_loss(teacher, student, cfg, compile_group: CompileGroup | None = None):
    """The stage-2 loss of one batch of token ids; extras (device tensors): kl, ce (student), teacher_ce, feature.
    With a ``compile_group`` that is enabled, the loss's element-wise work per chunk (:func:`kd_chunk`) runs compiled."""
    head_t, features = teacher.get_output_embeddings(), cfg.feature_weight > 0
    grads = (cfg.kl_weight > 0, cfg.ce_weight > 0)
    chunk_math = compile_group.wrap(kd_chunk) if compile_group is not None else kd_chunk
    transform = logit_transform(student)

    def loss_fn(ids: torch.Tensor):
        t_hidden = teacher_hidden(teacher, ids, features)
        s_hidden = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[1:]
        kl, ce, ce_t = kd_terms(s_hidden[-1], t_hidden[-1], ids, student.lm_head, head_t, cfg.temperature, cfg.kl_chunk, grads, chunk_math,
                                transform)  # fmt: skip
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce
        extras = {"kl": kl.detach(), "ce": ce.detach(), "teacher_ce": ce_t}
        if features:
            feat = feature_loss(s_hidden, t_hidden)
            loss = loss + cfg.feature_weight * feat
            extras["feature"] = feat.detach()
        return loss, extras

    return loss_fn


@torch.no_grad()
def heldout_losses(teacher, student, blocks: torch.Tensor, batch_size: int, chunk: int, autocast_ctx) -> dict:
    """KL(teacher || student) at T=1, student CE and teacher CE on held-out blocks (means over tokens)."""
    head_t = teacher.get_output_embeddings()
    device = next(student.parameters()).device
    sums, n = {"kl": 0.0, "student_ce": 0.0, "teacher_ce": 0.0}, 0
    for s in range(0, blocks.shape[0], batch_size):
        ids = blocks[s : s + batch_size].to(device)
        with autocast_ctx():
            t_h = teacher_hidden(teacher, ids, False)[-1]
            s_h = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            kl, ce, ce_t = kd_terms(s_h, t_h, ids, student.lm_head, head_t, 1.0, chunk, transform=logit_transform(student))
        w = ids.shape[0]
        sums["kl"] += kl * w
        sums["student_ce"] += ce * w
        sums["teacher_ce"] += ce_t * w
        n += w
    return {**{k: round(float(v) / max(1, n), 6) for k, v in sums.items()}, "seq_len": int(blocks.shape[1])}


class _DecoderLayer(nn.Module):
    """One decoder layer of the student as a module of its own, for ``torch.compile``: every layer's
    wrapper shares this class's code, so identical layers compile once."""

    def __init__(self, layer: nn.Module, step):
        super().__init__()
        self.layer, self.step = layer, step

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.step(self.layer, h, ctx)


def compile_layers(student, group: CompileGroup):
    """Run the student's decoder layers compiled (when ``group`` is enabled); returns the undo function.

    The student's forward calls ``self._layer(layer, h, ctx)`` for every layer, or under gradient checkpointing
    ``self._checkpointed_layer(layer, h, ctx)``; instance attributes of those names route each call to its
    layer's compiled wrapper. Under checkpointing the checkpoint is inside the compiled graph (as torchtitan
    compiles its checkpointed blocks): a compiled call inside an eager checkpoint would be recomputed through
    another graph than the forward's, whose saved tensors need not match.
    """
    if not group.enabled:
        return lambda: None
    eager = type(student)._layer
    eager_checkpointed = functools.partial(checkpoint, eager)  # traced inside the compiled layer; eagerly if it fails
    plain = {id(layer): group.wrap(_DecoderLayer(layer, eager)) for layer in student.model.layers}
    checkpointed = {id(layer): group.wrap(_DecoderLayer(layer, eager_checkpointed)) for layer in student.model.layers}

    def route(wrapped, fallback):
        def layer_step(layer, h, ctx):
            call = wrapped.get(id(layer))
            if call is None:
                return fallback(layer, h, ctx)
            if torch.is_grad_enabled() and not h.requires_grad:
                h = h.detach().requires_grad_()  # the first layer's input too: the same graph as the others
            # a context without the RoPE cache keyed by object ids: one compiled graph per layer kind
            return call(h, layer_context(ctx))

        return layer_step

    student._layer = route(plain, eager)
    student._checkpointed_layer = route(checkpointed, eager_checkpointed)

    def undo():
        student.__dict__.pop("_layer", None)
        student.__dict__.pop("_checkpointed_layer", None)

    return undo


def compile_teacher_layers(teacher, group: CompileGroup):
    """Run the teacher's decoder layers compiled in stage 2 (when ``group`` is enabled); returns the undo function.

    The teacher's forward in stage 2 is inference only, and eagerly it issues about 40 small kernels a layer
    (float32 norms, RoPE, activations); compiled, one graph serves every layer. Each layer's ``forward`` is
    replaced by an instance attribute, so hooks on the layer (the feature loss's) still run around it, and the
    modules the student shares with the teacher are untouched. The teacher's plain-forward baseline and every
    evaluation stay eager (the undo runs when the stage ends), and so does the profile's teacher forward
    (``convert.plain_forward``).
    """
    return compile_forwards(list(family_for(teacher.config).layers(teacher)), group)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def unshare(student, teacher, which: str) -> None:
    """Give the student its own fp32 copies of the teacher modules that ``which`` trains.

    Frozen modules are shared with the teacher; training one in place would change the teacher too.
    ``attention`` copies nothing; ``attention+norms`` copies every norm; ``all`` copies every shared
    module (a second set of weights). Ties between copied modules (embeddings/LM head) are kept.
    """
    if which == "attention":
        return
    teacher_modules = {id(m) for m in teacher.modules()}
    memo: dict = {}
    swaps = []
    for parent in student.modules():
        if id(parent) in teacher_modules:
            continue
        for name, child in parent.named_children():
            if id(child) in teacher_modules and (which == "all" or _is_norm(child)):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, copy.deepcopy(child, memo).float())


def trainable(student, which: str) -> list[tuple[str, nn.Parameter]]:
    """Stage 2's trainable set: edited attention, plus norms, or everything (after :func:`unshare`)."""
    if which == "all":
        return list(student.named_parameters())
    chosen = dict(attention_trainable(student))
    if which == "attention+norms":
        for mname, module in student.named_modules():
            if _is_norm(module):
                for pname, p in module.named_parameters(recurse=False):
                    chosen.setdefault(f"{mname}.{pname}" if mname else pname, p)
    return list(chosen.items())


def attention_extra_width(edited) -> list[int]:
    """Values per token that each edited layer's attention saves for stage 2's backward beyond the teacher's:
    an MLA layer up-projects its latent to every head's K (no-RoPE part) and V (``kv_b_proj``, heads x (nope +
    v) wide) where the teacher keeps grouped K and V (2 x kv heads x head dim). Read from the edited config's
    attention spec and layer list, as the KV figures are (``eval/kv.py``)."""
    spec = edited.teacher_attention
    kv = 2 * spec["num_kv_heads"] * spec["head_dim"]
    up = [spec["num_heads"] * (x["qk_nope_head_dim"] + x["v_head_dim"]) for x in edited.layer_attention if x["kind"] == "mla"]
    return [max(0, w - kv) for w in up]


def mlp_width(config) -> tuple[int, int]:
    """(MLP width activated per token, router outputs per token): an MoE layer runs only its routed
    ``num_experts_per_tok`` experts on a token, so memory does not grow with the number of experts."""
    experts = getattr(config, "num_experts", 0) or 0
    if experts:
        return config.moe_intermediate_size * config.num_experts_per_tok, experts
    return getattr(config, "intermediate_size", None) or MLP_RATIO * config.hidden_size, 0


class Stage2(Stage):
    """Stage 2 as the conversion runs it: the whole student distilled from the teacher's distributions."""

    number = 2
    compiles = "the stage-2 decoder layers (student and teacher)"

    @property
    def trains(self) -> str:
        return self.cfg.trainable

    @property
    def gradient_checkpointing(self) -> bool:
        return self.cfg.gradient_checkpointing

    def prepare(self, student, teacher) -> None:
        unshare(student, teacher, self.cfg.trainable)

    def trainable(self, student):
        return trainable(student, self.cfg.trainable)

    def loss(self, ctx: Conversion, group: CompileGroup):
        return make_loss(ctx.teacher, ctx.student, self.cfg, group)

    def train_mode(self, student) -> None:
        student.gradient_checkpointing = self.cfg.gradient_checkpointing
        student.checkpointed_layers = self.recomputed_layers  # None: every layer
        # the layer loop checkpoints only in training mode; set the flag on the top module alone, so the
        # shared teacher modules stay in eval mode (no dropout or router noise in the teacher)
        student.training = self.cfg.gradient_checkpointing

    def compile(self, ctx: Conversion, group: CompileGroup):
        undos = [compile_layers(ctx.student, group)]
        if ctx.parallel.compile_frozen:  # FSDP2 wraps the teacher's layers itself: left eager there
            undos.append(compile_teacher_layers(ctx.teacher, group))
        return lambda: [undo() for undo in reversed(undos)]

    def activation_bytes(self, config, edited, micro, recomputed, device, abytes):
        """Each decoder layer's internals (attention, MLP or routed experts, router; on the CPU the attention
        scores), but of the first ``recomputed`` layers under gradient checkpointing only the input (one layer's
        internals while it is recomputed, after the later layers' are freed); the teacher's hidden states the loss
        compares with; one KD chunk's fp32 vocabulary-sized tensors."""
        cfg, t, h = self.cfg, self.seq_len, config.hidden_size
        tokens, layers = micro * t, config.num_hidden_layers
        width, router = mlp_width(config)
        extra = attention_extra_width(edited)
        scores = score_bytes(device, micro, config.num_attention_heads, t, abytes)
        layer = tokens * (LAYER_SAVED * h + MLP_SAVED * width + router) * abytes + scores  # one layer's internals
        n = min(int(recomputed), layers)
        plain = (layers - n) * layer + tokens * sum(extra) * abytes * (layers - n) / layers  # the layers not recomputed
        # the recomputed layers are the first ones, whose backward runs last: one of them is recomputed after the
        # other layers' activations are freed
        rerun = layer + tokens * max(extra, default=0) * abytes if n else 0
        kept = n * tokens * h * abytes + max(plain, rerun)
        # the teacher's final hidden state; with feature matching all of its layers' and the student's final one,
        # which the cosine keeps (the student's other states are the layers' inputs, counted above)
        teacher = (layers + 1 if cfg.feature_weight > 0 else 1) * tokens * h * abytes
        logits = min(cfg.kl_chunk, tokens) * config.vocab_size * FP32 * KD_VOCAB_TENSORS
        return kept + teacher + logits
