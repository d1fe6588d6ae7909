"""Recall spans: long-range retrieval made part of ordinary training text (``stage2.recall_fraction``).

In a chosen fraction of the training blocks, one span of the block's own text (32-256 tokens) is copied
over text further on: the source's start is uniform over the block (leaving room for the copy), the
destination's uniform after the source, so distances lean short (2,048-token blocks: median 476 tokens,
46% further back than 516; 8,192-token blocks: median 1,691, 82%). Where the copy starts
the teacher recognises text it has seen and predicts the rest of it almost surely (induction); a student
whose sliding-window layers cannot see the first occurrence must fetch it through its full-attention
layers (or its latent cache) to match the teacher's distribution there. Nothing else changes: the loss
is still the distillation on the teacher's own predictions, so this is a data mix, not a new objective,
and it is unlike the passkey prompts the evaluation uses (no instruction, no question, no digits).

The choice for a block depends only on its tokens and the seed, so a resumed run draws the same spans.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import AttnEditError

SPAN = (32, 256)  # copied span length in tokens, inclusive range


def spans_fit(seq_len: int, min_distance: int = 0) -> bool:
    """Whether a block of ``seq_len`` tokens can hold a span and its copy (two of the shortest length), the copy
    starting ``min_distance`` tokens or more after the span."""
    return seq_len >= SPAN[0] + max(SPAN[0], min_distance)


def _generator(block: torch.Tensor, seed: int) -> torch.Generator:
    digest = hashlib.blake2b(block.to(torch.int64).numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _draw(g: torch.Generator, low: int, high: int) -> int:
    """An integer uniform in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def recall_plan(block: torch.Tensor, fraction: float, seed: int = 0, min_distance: int = 0) -> tuple[int, int, int] | None:
    """``(source, destination, length)`` of the span copied in ``block`` (1-D token ids), or None when the
    block is left as it is (by chance, or because it is too short for two spans of the shortest length, or for
    a copy ``min_distance`` tokens or more after its source). ``min_distance`` (0: the copy only follows the
    span) puts the copy's start at least that far after the source's, e.g. ``window + 1`` so that a sliding
    layer cannot see any token of the source from its copy; with 0 the draws are those of earlier versions."""
    if not 0.0 <= fraction <= 1.0:
        raise AttnEditError(f"recall_fraction={fraction!r}: must be between 0 and 1 (e.g. 0.5; 0 = off)")
    if min_distance < 0:
        raise AttnEditError(f"recall_min_distance={min_distance!r}: must be >= 0 tokens (0 = any distance)")
    t = block.numel()
    if fraction == 0.0 or not spans_fit(t, min_distance):
        return None
    g = _generator(block, seed)
    if float(torch.rand((), generator=g)) >= fraction:
        return None
    length = _draw(g, SPAN[0], min(SPAN[1], t // 2))
    gap = max(length, min_distance)  # from the source's start to the copy's
    if t - length - gap < 0:
        return None
    source = _draw(g, 0, t - length - gap)
    destination = _draw(g, source + gap, t - length)
    return source, destination, length


def recall_spans(ids: torch.Tensor, fraction: float, seed: int = 0, min_distance: int = 0) -> tuple[torch.Tensor, list]:
    """``ids`` ([batch, seq] token ids, on the CPU) with a recall span copied into a ``fraction`` of its rows (a
    new tensor; rows left alone are unchanged), and each row's ``(source, destination, length)`` or None."""
    out, plans = ids.clone(), []
    for row in out:
        plan = recall_plan(row, fraction, seed, min_distance) if fraction else None
        if plan is not None:
            source, destination, length = plan
            row[destination : destination + length] = row[source : source + length].clone()
        plans.append(plan)
    return out, plans


def with_recall_spans(ids: torch.Tensor, fraction: float, seed: int = 0, min_distance: int = 0) -> torch.Tensor:
    """:func:`recall_spans`' token ids alone; ``fraction`` 0 returns ``ids`` itself."""
    if fraction == 0.0:
        return ids
    return recall_spans(ids, fraction, seed, min_distance)[0]


def recall_targets(plans: list, seq_len: int, window: int, sink: int = 0) -> torch.Tensor:
    """[rows, seq_len] bool: the positions whose next token a copy predicts from a source that a sliding layer of
    ``window`` tokens (+ ``sink`` first ones) cannot see - the long-range targets of a batch from
    :func:`recall_spans`. Position ``p`` of a copy predicts token ``p + 1``, whose first occurrence is token
    ``source + (p - destination) + 1``: a target when that token is ``window`` or more tokens back and not a sink."""
    mask = torch.zeros(len(plans), seq_len, dtype=torch.bool)
    for row, plan in enumerate(plans):
        if plan is None:
            continue
        source, destination, length = plan
        p = torch.arange(destination, destination + length - 1)
        first = source + (p - destination) + 1
        mask[row, p[(p - first >= window) & (first >= sink)]] = True
    return mask


def long_range_blocks(ids: torch.Tensor, window: int, sink: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [rows, seq] with a recall span in every row copied ``window + 1`` or more tokens after its source, and
    their long-range targets (:func:`recall_targets`): what GateSWA's ``auto_score: recall`` measures windowing on."""
    out, plans = recall_spans(ids, 1.0, seed=seed, min_distance=window + 1)
    targets = recall_targets(plans, ids.shape[1], window, sink)
    if not bool(targets.any()):
        raise AttnEditError(
            f"auto_score=recall: calibration blocks of {ids.shape[1]} tokens cannot hold a span copied more than the "
            f"window ({window}) after itself; use longer blocks (auto_seq_len, e.g. 4 x the window) or auto_score=kl"
        )
    return out, targets
