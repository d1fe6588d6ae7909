"""Greedy generation through a model's own cache, one token at a time: what passkey answers with and what every
bench engine on attnedit's engine times (a prefill, then one-token decode steps)."""

from __future__ import annotations

import inspect

import torch


def new_cache(model):
    """The model's own cache: attnedit's for edited models, a transformers ``DynamicCache`` otherwise."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_kwarg(model) -> str:
    """The forward's name for the cache: transformers renamed ``past_key_values`` to ``cache`` in 5.2x; attnedit
    models take both."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.no_grad()
def next_token(model, ids: torch.Tensor, cache, cache_kw: str | None = None) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` and return the greedy next token of each row, ``[batch, 1]``.
    ``cache_kw`` (the forward's name for the cache) can be given to keep its look-up out of compiled code."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw or cache_kwarg(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


def generate_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill ``ids`` and decode ``new_tokens`` tokens greedily, one at a time, with the model's real cache."""
    cache = new_cache(model)
    out = [next_token(model, ids, cache)]
    for _ in range(new_tokens - 1):
        out.append(next_token(model, out[-1], cache))
    return torch.cat(out, dim=1)
