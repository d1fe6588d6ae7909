"""Stage 1: layer-wise teacher forcing.

One teacher forward per batch (no grad) captures, for every edited layer i, the input of its
attention (after the input norm) ``x_i`` and the teacher attention's output ``y_i`` (before the
residual add). Every edited student attention then runs on the *teacher's* ``x_i``, all at once,
with the loss ``sum_i MSE(y_hat_i, y_i) / Var(y_i)``: normalised per layer so that no layer dominates,
and free of error accumulation because no layer sees another student layer's output.

The per-layer losses and relative errors stay on the device (the trainer reads them at log steps only);
with compilation on, each layer's attention and loss run as one compiled graph, shared by the layers.
:class:`Stage1` is the stage as the conversion runs it (``base.Stage``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..distributed.memory import score_bytes
from ..families import family_for
from ..families.hooks import StopForward, watch
from ..targets import AttentionContext
from .base import Conversion, Stage
from .speed import CompileGroup, compile_forwards, layer_context

# Activation memory (bytes per token and edited layer, in hidden-sized tensors), checked against measured
# peaks on an H100: SmolLM2 -> MLA at 16 x 1024 peaked at 5.4 GiB (6.4 under torchrun), estimate 6.5.
CAPTURED = 2  # the teacher's x_i and y_i, kept for the whole step
SAVED = 9  # what one edited attention saves for backward (q, k, v, rotations, output)


@contextlib.contextmanager
def teacher_taps(teacher, layers: list[int]):
    """Hooks on the teacher's attention modules; yields ``{'x': {i: input}, 'y': {i: output}}``."""
    family = family_for(teacher.config)
    found: dict[str, dict[int, torch.Tensor]] = {"x": {}, "y": {}}
    last = max(layers)

    def on_input(i, x):
        found["x"][i] = x

    def on_output(i, y):
        found["y"][i] = y
        if i == last:
            raise StopForward  # the teacher's remaining layers and LM head are not needed

    with watch({i: family.attention(teacher, i) for i in layers}, on_input, on_output):
        yield found


@torch.no_grad()
def capture(teacher, layers: list[int], ids: torch.Tensor) -> tuple[dict, dict]:
    """Each listed layer's attention input and output for one batch, from a single teacher forward."""
    with teacher_taps(teacher, layers) as found, contextlib.suppress(StopForward):
        teacher.model(input_ids=ids, use_cache=False)
    return found["x"], found["y"]


class LayerLoss(nn.Module):
    """One edited attention on the teacher's input: its normalised MSE (differentiable) and relative error.

    A module, so that ``torch.compile`` sees one graph per layer kind: every layer's wrapper shares it.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: AttentionContext, var: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = y.float()
        mse = (self.attn(x, ctx).float() - y).pow(2).mean()
        loss = mse / (y.var() if var is None else var).clamp_min(1e-12)  # var: the global batch's, when sharded
        rel_err = torch.sqrt(mse.detach() / y.pow(2).mean().clamp_min(1e-12))
        return loss, rel_err


def layer_losses(terms: dict, xs: dict, ys: dict, ctx: AttentionContext, variances: dict | None = None) -> tuple[list, list]:
    """Per-layer normalised MSE (differentiable) and relative error ``||y_hat - y|| / ||y||`` (device tensors)."""
    losses, rel_errs = [], []
    for i, term in terms.items():
        loss, rel_err = term(xs[i], ys[i], ctx, *([variances[i]] if variances else []))
        losses.append(loss)
        rel_errs.append(rel_err)
    return losses, rel_errs


def make_loss(teacher, student, compile_group: CompileGroup | None = None, batch_variances=None):
    """The stage-1 loss of one batch of token ids, plus per-layer figures (device tensors) for the metrics.

    With a ``compile_group`` that is enabled, each layer's attention and loss run compiled.
    ``batch_variances(ys)``: each layer's output variance over the whole global batch when this process
    holds a slice of it (the strategy's; None, or returning None: the batch's own).
    """
    layers = list(student.config.edit["edited_layers"])
    modules = student.attentions()
    group = compile_group or CompileGroup(False, "stage-1 attention")
    terms = {i: group.wrap(LayerLoss(modules[i])) for i in layers}
    compiled = group.enabled

    def loss_fn(ids: torch.Tensor):
        xs, ys = capture(teacher, layers, ids)
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device)[None].expand(b, t)
        ctx = AttentionContext(positions, n_cached=0, q_len=t, key_padding=None, cache=None)
        if compiled:
            ctx = layer_context(ctx)  # one compiled graph serves every layer of a kind
            student.prepare_attention(t, ids.device)
        variances = batch_variances(ys) if batch_variances is not None else None
        losses, rel_errs = layer_losses(terms, xs, ys, ctx, variances)
        loss = torch.stack(losses).sum()
        rel = torch.stack([torch.as_tensor(r, dtype=torch.float32, device=loss.device) for r in rel_errs])
        return loss, {"layer_loss": torch.stack(losses).detach(), "layer_rel_err": rel.detach()}

    return loss_fn


def compile_teacher_modules(teacher, layers: list[int], group: CompileGroup):
    """Run the teacher's capture forward compiled in stage 1 (when ``group`` is enabled); returns the undo.

    Eagerly the capture issues about 40 small kernels a layer (float32 norms, RoPE, activations), half the
    stage's launches and as much device time as the student's step (H100 profile). The taps sit on the
    teacher's attention modules, so the decoder layer itself cannot be one graph; instead every module of
    the layers the capture runs (attention, norms, MLP) gets a compiled ``forward``: the taps' hooks still
    run around the attention, each module class compiles once, and only the residual adds stay eager. The
    modules the student shares with the teacher (norms, MLP) run only here in stage 1; the undo runs when the
    stage ends.
    """
    if not group.enabled:
        return lambda: None
    ran = list(family_for(teacher.config).layers(teacher))[: max(layers) + 1]
    return compile_forwards([m for layer in ran for m in layer.children()], group)


def trainable(student) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1 trains the new attention modules of the edited layers, nothing else."""
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in student.config.edit["edited_layers"])
    return [(n, p) for n, p in student.named_parameters() if n.startswith(prefixes)]


class Stage1(Stage):
    """Stage 1 as the conversion runs it: the new attentions trained on the teacher's activations."""

    number = 1
    compiles = "the stage-1 attentions and the teacher's capture"

    def trainable(self, student):
        return trainable(student)

    def loss(self, ctx: Conversion, group: CompileGroup):
        return make_loss(ctx.teacher, ctx.student, group, ctx.parallel.batch_variances)

    def compile(self, ctx: Conversion, group: CompileGroup):
        if not ctx.parallel.compile_frozen:  # FSDP2 wraps the teacher's modules itself: left eager there
            return lambda: None
        return compile_teacher_modules(ctx.teacher, ctx.edited_layers, group)

    def activation_bytes(self, config, edited, micro, recomputed, device, abytes):
        """Every edited layer's captured input and output and its attention's saved tensors (plus, on the
        CPU, its scores): the layers train side by side, so all of them are kept at once."""
        n_edited, t, h = len(edited.edit["edited_layers"]), self.seq_len, config.hidden_size
        scores = score_bytes(device, micro, config.num_attention_heads, t, abytes)
        return n_edited * (micro * t * h * (CAPTURED + SAVED) * abytes + scores)
