"""Stage 1: layer-wise teacher forcing.

One teacher forward per batch (no grad) captures, for every edited layer i, the input of its
attention (after the input norm) ``x_i`` and the teacher attention's output ``y_i`` (before the
residual add). Every edited student attention then runs on the *teacher's* ``x_i``, all at once,
with the loss ``sum_i MSE(y_hat_i, y_i) / Var(y_i)``: normalised per layer so that no layer dominates,
and free of error accumulation because no layer sees another student layer's output.

The per-layer losses and relative errors stay on the device (the trainer reads them at log steps only);
with compilation on, each layer's attention and loss run as one compiled graph, shared by the layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .. import distributed
from ..families import family_for
from ..families.hooks import watch
from ..targets import AttentionContext
from .speed import CompileGroup, compile_forwards, layer_context


class _Stop(Exception):
    """Raised by the last hook: the teacher's remaining layers and LM head are not needed."""


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
            raise _Stop

    with watch({i: family.attention(teacher, i) for i in layers}, on_input, on_output):
        yield found


@torch.no_grad()
def capture(teacher, layers: list[int], ids: torch.Tensor) -> tuple[dict, dict]:
    """Each listed layer's attention input and output for one batch, from a single teacher forward."""
    with teacher_taps(teacher, layers) as found, contextlib.suppress(_Stop):
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
        loss = mse / (y.var() if var is None else var).clamp_min(1e-12)  # var: the global batch's (issue 13)
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


def make_loss(teacher, student, compile_group: CompileGroup | None = None):
    """The stage-1 loss of one batch of token ids, plus per-layer figures (device tensors) for the metrics.

    With a ``compile_group`` that is enabled, each layer's attention and loss run compiled.
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
        variances = None
        if distributed.is_distributed():  # issue 13: normalise by the whole global batch's variance, as one process
            from ..distributed.data_parallel import global_variances

            variances = global_variances(ys)
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
    stage ends. Off under torchrun (FSDP2 wraps the teacher's layers itself).
    """
    if not group.enabled or distributed.is_distributed():
        return lambda: None
    ran = list(family_for(teacher.config).layers(teacher))[: max(layers) + 1]
    return compile_forwards([m for layer in ran for m in layer.children()], group)


def trainable(student) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1 trains the new attention modules of the edited layers, nothing else."""
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in student.config.edit["edited_layers"])
    return [(n, p) for n, p in student.named_parameters() if n.startswith(prefixes)]
