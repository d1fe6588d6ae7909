"""Which layers should stay full: each layer's cost of being restricted to a sliding window, measured.

For a GateSWA conversion with ``full_layers: auto:K``, the K layers kept full are those whose
restriction to the window (with its sink tokens) changes the teacher's next-token distributions most.
One teacher forward per layer on calibration blocks, each with only that layer windowed (the teacher's
own weights, on attnedit's engine): ``KL(teacher || teacher with layer i windowed)`` per token, averaged
over the positions the window actually cuts (those past ``window + sink``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import AttnEditError
from .settings import parse_auto

KL_CHUNK = 1024  # positions per piece of the KL: fp32 log-softmaxes never exceed rows x KL_CHUNK x vocab


def _kl_per_token(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(logits_ref.float(), -1), log_target=True, reduction="none").sum(-1)


def _kl_sums(logits_ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[float, float]:
    """Summed KL(ref || logits) over every position, and over the positions ``targets`` [rows, positions] marks
    (0 without it), a piece of ``KL_CHUNK`` positions at a time."""
    total = marked = 0.0
    for c in range(0, logits.shape[1], KL_CHUNK):
        kl = _kl_per_token(logits_ref[:, c : c + KL_CHUNK], logits[:, c : c + KL_CHUNK])
        total += float(kl.sum())
        if targets is not None:
            marked += float((kl * targets[:, c : c + KL_CHUNK].to(kl.device)).sum())
    return total, marked


@contextmanager
def windowed(attn, window: int, sink: int, kv_head: int | None = None):
    """Restrict a teacher attention (on attnedit's engine) to ``window`` (+ ``sink``) while inside: the whole
    layer, or only its KV head ``kv_head`` (the others stay full)."""
    from ..targets.split_heads import set_full_kv_heads

    attn.window, attn.sink = window, sink
    if kv_head is not None and attn.num_kv_heads > 1:
        set_full_kv_heads(attn, [h for h in range(attn.num_kv_heads) if h != kv_head])
    try:
        yield
    finally:
        attn.window, attn.sink = None, 0
        set_full_kv_heads(attn, None)


@torch.no_grad()
def windowing_costs(
    teacher,
    ids: torch.Tensor,
    window: int,
    sink: int,
    units: list | None = None,
    targets: torch.Tensor | None = None,
    batch_tokens: int = 8192,
) -> dict:
    """What restricting each unit alone to ``window`` (+ ``sink``) costs the teacher on ``ids`` [n, T]: a unit is
    ``(layer, None)`` (the whole layer; default: every layer) or ``(layer, kv_head)`` (one KV head and its query
    heads). ``{"kl": mean KL (nats per token) over the positions past window + sink, "recall": mean KL over the
    positions ``targets`` [n, T] marks (the long-range targets of recall spans), or None without targets}``.
    A layer already sliding in the teacher costs 0 (nothing to measure).

    Rows go through the model ``batch_tokens // T`` at a time (at least one), and the KL is taken in
    pieces, so memory follows the tokens of one batch, not the block length squared or the vocabulary
    times every position (8,192-token blocks four at a time, with the KL in one piece, held 38 GiB)."""
    from .edit import teacher_on_attnedit

    t = ids.shape[1]
    if t <= window + sink:
        raise AttnEditError(
            f"calibration blocks of {t} tokens are not longer than window + sink = {window + sink}: "
            "the window cuts nothing there; use longer blocks (data.seq_len) or a smaller window"
        )
    model = teacher_on_attnedit(teacher)
    device = next(model.parameters()).device
    attentions = model.attentions()
    units = units if units is not None else [(i, None) for i in range(len(attentions))]
    kl, recall = [0.0] * len(units), [0.0] * len(units)
    start = window + sink
    batch_size = max(1, batch_tokens // t)
    for s in range(0, ids.shape[0], batch_size):
        batch = ids[s : s + batch_size].to(device)
        marks = targets[s : s + batch_size, start:] if targets is not None else None
        ref = model(input_ids=batch).logits[:, start:]
        for i, (layer, head) in enumerate(units):
            attn = attentions[layer]
            if attn.window is not None:  # already sliding in the teacher: nothing to measure
                continue
            with windowed(attn, window, sink, head):
                out = model(input_ids=batch).logits[:, start:]
            total, marked = _kl_sums(ref, out, marks)
            kl[i] += total
            recall[i] += marked
            del out
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back what the measurement cached before training allocates
    n = ids.shape[0] * (t - start)
    n_marked = int(targets[:, start:].sum()) if targets is not None else 0
    return {"kl": [x / n for x in kl], "recall": [x / max(1, n_marked) for x in recall] if targets is not None else None}


def window_sensitivity(teacher, ids: torch.Tensor, window: int, sink: int, batch_tokens: int = 8192) -> list[float]:
    """Per layer, the mean KL (nats per token) that restricting only that layer to ``window`` (+ ``sink``)
    costs the teacher on ``ids`` [n, T], over the positions past ``window + sink`` (:func:`windowing_costs`)."""
    return windowing_costs(teacher, ids, window, sink, batch_tokens=batch_tokens)["kl"]


def resolve_auto_full_layers(teacher, target_args: dict, calibration, measured: dict | None = None) -> tuple[dict, dict | None]:
    """``target_args`` with ``full_layers: auto:K`` replaced by explicit layers, and the record of the
    choice (K, chosen layers, per-layer scores, window, sink); unchanged args and None without ``auto:K``.

    ``measured``, a record from an earlier start of the run, is applied as it is; otherwise the layers are
    measured on ``calibration()`` (called only then: token ids [n, T]).
    """
    from .edit import edited_config

    k = parse_auto(target_args.get("full_layers", ""))
    if k is None:
        return target_args, None
    if measured is None and k > 0:
        plan = edited_config(teacher.config, "gateswa", target_args)  # resolves the window and sink defaults
        layer = next(x for x in plan.layer_attention if x.get("kind") == "gateswa")
        window, sink = layer["window"], layer["sink"]
        scores = window_sensitivity(teacher, calibration(), window, sink)
        chosen = choose_full_layers(scores, k)
        measured = {"auto": k, "chosen": chosen, "window": window, "sink": sink, "scores_kl": [round(x, 8) for x in scores]}
    chosen = measured["chosen"] if measured is not None else []
    return {**target_args, "full_layers": ",".join(map(str, chosen)) or "none"}, measured


def choose_full_layers(scores: list[float], k: int) -> list[int]:
    """The ``k`` layers with the largest scores, in layer order (ties: the earlier layer)."""
    if k > len(scores):
        raise AttnEditError(f"full_layers=auto:{k}: the model has only {len(scores)} layers")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])
