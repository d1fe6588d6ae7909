"""Stage 1: layer-wise teacher forcing.

One teacher forward per batch (no grad) captures, for every edited layer i, the input of its
attention (after the input norm) ``x_i`` and the teacher attention's output ``y_i`` (before the
residual add). Every edited student attention then runs on the *teacher's* ``x_i``, all at once,
with the loss ``sum_i MSE(y_hat_i, y_i) / Var(y_i)``: normalised per layer so that no layer dominates,
and free of error accumulation because no layer sees another student layer's output.
"""

from __future__ import annotations

import contextlib

import torch

from ..families import family_for
from ..targets import AttentionContext


class _Stop(Exception):
    """Raised by the last hook: the teacher's remaining layers and LM head are not needed."""


@contextlib.contextmanager
def teacher_taps(teacher, layers: list[int]):
    """Hooks on the teacher's attention modules; yields ``{'x': {i: input}, 'y': {i: output}}``."""
    family = family_for(teacher.config)
    found: dict[str, dict[int, torch.Tensor]] = {"x": {}, "y": {}}
    last = max(layers)
    hooks = []
    for i in layers:

        def pre(module, args, kwargs, i=i):
            found["x"][i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(module, args, kwargs, output, i=i):
            found["y"][i] = output[0] if isinstance(output, tuple) else output
            if i == last:
                raise _Stop

        attn = family.attention(teacher, i)
        hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(attn.register_forward_hook(post, with_kwargs=True))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def capture(teacher, layers: list[int], ids: torch.Tensor) -> tuple[dict, dict]:
    """Each listed layer's attention input and output for one batch, from a single teacher forward."""
    with teacher_taps(teacher, layers) as found, contextlib.suppress(_Stop):
        teacher.model(input_ids=ids, use_cache=False)
    return found["x"], found["y"]


def layer_losses(attentions: dict, xs: dict, ys: dict, ctx: AttentionContext) -> tuple[list, list]:
    """Per-layer normalised MSE (differentiable) and relative error ``||y_hat - y|| / ||y||`` (a float)."""
    losses, rel_errs = [], []
    for i, attn in attentions.items():
        y = ys[i].float()
        mse = (attn(xs[i], ctx).float() - y).pow(2).mean()
        losses.append(mse / y.var().clamp_min(1e-12))
        rel_errs.append(torch.sqrt(mse.detach() / y.pow(2).mean().clamp_min(1e-12)).item())
    return losses, rel_errs


def make_loss(teacher, student):
    """The stage-1 loss of one batch of token ids, plus per-layer figures for the metrics."""
    layers = list(student.config.edit["edited_layers"])
    modules = student.attentions()
    attentions = {i: modules[i] for i in layers}

    def loss_fn(ids: torch.Tensor):
        xs, ys = capture(teacher, layers, ids)
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device)[None].expand(b, t)
        ctx = AttentionContext(positions, past_length=0, q_len=t, key_padding=None, cache=None)
        losses, rel_errs = layer_losses(attentions, xs, ys, ctx)
        loss = torch.stack(losses).sum()
        return loss, {"layer_loss": [round(x.item(), 6) for x in losses], "layer_rel_err": [round(x, 6) for x in rel_errs]}

    return loss_fn


def trainable(student) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1 trains the new attention modules of the edited layers, nothing else."""
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in student.config.edit["edited_layers"])
    return [(n, p) for n, p in student.named_parameters() if n.startswith(prefixes)]
