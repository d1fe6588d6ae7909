"""Stage 2: model-level distillation.

Loss = ``kl_weight * T^2 KL(p_T^(1/T) || p_S^(1/T))`` on every position's next-token distribution
``+ ce_weight * CE`` on the data ``+ feature_weight * sum_l (1 - cos(h_S,l, h_T,l))`` on hidden states.

The student shares its frozen weights with the teacher. The loss never materialises full-vocabulary
logits for the whole batch: the LM head and softmaxes run over ``kl_chunk`` tokens at a time, each
chunk under activation checkpointing, so only the final hidden states are kept for the backward pass.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..families import family_for
from .stage1 import trainable as attention_trainable


@contextlib.contextmanager
def _layer_outputs(teacher, layers: list[int]):
    family = family_for(teacher.config)
    found: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layers:

        def post(module, args, output, i=i):
            found[i] = output[0] if isinstance(output, tuple) else output

        hooks.append(family.layers(teacher)[i].register_forward_hook(post))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def teacher_hidden(teacher, ids: torch.Tensor, all_layers: bool) -> list[torch.Tensor]:
    """The teacher's outputs of layers 0..L-2 (if ``all_layers``) and its final normed hidden state.

    The same layout as the student's ``hidden_states[1:]``, so features pair up index by index.
    """
    n = teacher.config.num_hidden_layers
    layers = list(range(n - 1)) if all_layers else []
    with _layer_outputs(teacher, layers) as found:
        final = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    return [found[i] for i in layers] + [final]


def _chunk_terms(h_s, h_t, labels, head_s, head_t, temperature: float):
    """KL(teacher || student) at temperature T, student CE and teacher CE, summed over a chunk of tokens."""
    z_s = head_s(h_s).float()
    with torch.no_grad():
        z_t = head_t(h_t).float()
    logp_s = F.log_softmax(z_s / temperature, dim=-1)
    logp_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(z_s, labels, ignore_index=-100, reduction="sum")
    ce_t = F.cross_entropy(z_t, labels, ignore_index=-100, reduction="sum")
    return kl, ce, ce_t


def kd_terms(h_s, h_t, ids, head_s, head_t, temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean ``T^2 KL`` per token, mean student CE and mean teacher CE over the next tokens, chunk by chunk."""
    hs, ht = h_s.flatten(0, 1), h_t.flatten(0, 1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    kl = ce = hs.new_zeros((), dtype=torch.float32)
    ce_t = 0.0
    grad = torch.is_grad_enabled()
    for s in range(0, hs.shape[0], chunk):
        args = (hs[s : s + chunk], ht[s : s + chunk], labels[s : s + chunk], head_s, head_t, temperature)
        k, c, ct = checkpoint(_chunk_terms, *args, use_reentrant=False) if grad else _chunk_terms(*args)
        kl, ce, ce_t = kl + k, ce + c, ce_t + ct.item()
    n_labels = max(1, int((labels != -100).sum()))
    return kl * temperature**2 / hs.shape[0], ce / n_labels, ce_t / n_labels


def feature_loss(student_hidden: list, teacher_hidden_: list) -> torch.Tensor:
    """``sum_l mean_tokens (1 - cos(h_S,l, h_T,l))``."""
    terms = [(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in zip(student_hidden, teacher_hidden_)]
    return torch.stack(terms).sum()


def make_loss(teacher, student, cfg):
    """The stage-2 loss of one batch of token ids; extras: kl, ce (student), teacher_ce and feature."""
    head_t, features = teacher.get_output_embeddings(), cfg.feature_weight > 0

    def loss_fn(ids: torch.Tensor):
        t_hidden = teacher_hidden(teacher, ids, features)
        s_hidden = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[1:]
        kl, ce, ce_t = kd_terms(s_hidden[-1], t_hidden[-1], ids, student.lm_head, head_t, cfg.temperature, cfg.kl_chunk)
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce
        extras = {"kl": kl.item(), "ce": ce.item(), "teacher_ce": ce_t}
        if features:
            feat = feature_loss(s_hidden, t_hidden)
            loss = loss + cfg.feature_weight * feat
            extras["feature"] = feat.item()
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
            kl, ce, ce_t = kd_terms(s_h, t_h, ids, student.lm_head, head_t, 1.0, chunk)
        w = ids.shape[0]
        sums["kl"] += kl.item() * w
        sums["student_ce"] += ce.item() * w
        sums["teacher_ce"] += ce_t * w
        n += w
    return {k: round(v / max(1, n), 6) for k, v in sums.items()}


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
