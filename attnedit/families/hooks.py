"""Reading a teacher's activations as it runs: the one forward-hook helper.

Surgery's calibration capture (:func:`capture_attention_inputs`), stage 1's attention taps and stage 2's layer
outputs all watch modules of one forward pass; :func:`watch` registers the hooks and always removes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn

from . import family_for

Callback = Callable[[int, torch.Tensor], None]


class StopForward(Exception):
    """Raised by a callback once it has what it needs: the model's remaining layers and head are not run (the
    caller suppresses it around the forward call)."""


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with, passed by keyword or as the first argument."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def module_output(output) -> torch.Tensor:
    """A module's main output: the first element when it returns a tuple (attention returns weights too)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def watch(modules: Mapping[int, nn.Module], on_input: Callback | None = None, on_output: Callback | None = None) -> Iterator[None]:
    """Call ``on_input(i, x)`` before and ``on_output(i, y)`` after each ``modules[i]`` runs, inside the block.

    A callback may raise (stage 1 stops the forward after the last layer it needs); the hooks are
    removed however the block ends. Callbacks never change what the module sees or returns.
    """
    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            on_input(i, module_input(args, kwargs))

        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            on_output(i, module_output(output))

        return hook

    try:
        for i, m in modules.items():
            if on_input is not None:
                handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
            if on_output is not None:
                handles.append(m.register_forward_hook(post(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_attention_inputs(teacher, layers: list[int], input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Run the teacher once and return each listed layer's attention input, flattened to [tokens, hidden]."""
    family = family_for(teacher.config)
    found: dict[int, torch.Tensor] = {}

    def keep(i, x):
        found[i] = x.detach().reshape(-1, x.shape[-1]).float().cpu()

    with watch({i: family.attention(teacher, i) for i in layers}, on_input=keep):
        teacher(input_ids=input_ids.to(teacher.device))
    return found
