"""The FSDP2 plan of an edited model: which modules are ``fully_shard`` units, and what stays whole.

The plan follows the edited model's structure (``AttnEditForCausalLM`` next to the teacher it shares
its frozen modules with, see ``attnedit/surgery/edit.py``); FSDP wraps those modules from outside, so
the remote code in ``attnedit/targets/`` is untouched.

Per decoder layer ``i``:

- **trained modules** (the student's new attention; in stage 2 also any module ``trainable`` gave the
  student its own copy of): one ``fully_shard`` unit each. Their fp32 weights, gradients and AdamW
  state are split over the ranks; a unit is all-gathered for its forward (and backward) and its
  gradients are reduce-scattered, averaged over ranks. No ``MixedPrecisionPolicy``: the weights stay
  fp32 and bf16 autocast does the rest, exactly as in one process.
- **frozen modules** (the teacher's MLP or MoE block, router and experts included; the teacher's
  attention): *replicated* (the default whenever they fit: they never train, so sharding them would
  only add an all-gather per layer and per forward: lessons item 6), or *sharded* when they do not fit
  (``ATTNEDIT_FROZEN=shard``, or ``auto`` with a GPU too small, see :mod:`.memory`). A sharded frozen
  module is one unit *shared by teacher and student*: the student's layer calls the very module the
  teacher's layer calls, so its weights exist once, sharded, and whichever model runs it all-gathers it.
  The teacher's q/k/v/o projections that an unedited student layer shares are units of their own for
  the same reason.
- embeddings, final norm, LM head and the per-layer norms stay whole on every rank: the chunked KD
  loss reads the LM head's weight directly, and norms are a few KB per layer. Trained norm copies
  (``trainable: attention+norms``) are replicated and their gradients all-reduced.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import AttnEditError
from ..families import family_for
from . import env

FROZEN_MODES = ("auto", "replicate", "shard")


def frozen_mode() -> str:
    mode = os.environ.get("ATTNEDIT_FROZEN", "auto")
    if mode not in FROZEN_MODES:
        raise AttnEditError(f"ATTNEDIT_FROZEN={mode!r}; use one of {', '.join(FROZEN_MODES)}")
    return mode


def _is_unit(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


_MESH = {}


def _mesh():
    if "mesh" not in _MESH:
        _MESH["mesh"] = env.mesh()
    return _MESH["mesh"]


def _shard(module: nn.Module | None) -> int:
    """``fully_shard`` one module (once); returns 1 if it became a unit now."""
    from torch.distributed.fsdp import fully_shard

    if module is None or _is_unit(module) or not any(True for _ in module.parameters()):
        return 0
    fully_shard(module, mesh=_mesh(), reshard_after_forward=True)
    return 1


def apply_plan(teacher, student, shard_frozen: bool) -> dict:
    """Make the plan's units (idempotent: call it at each stage's start, after ``stage2.unshare``).

    Returns counts of the units made now, for the log.
    """
    family = family_for(teacher.config)
    teacher_params = {id(p) for p in teacher.parameters()}
    made = {"trained": 0, "frozen": 0}
    for i, (t_layer, s_layer) in enumerate(zip(family.layers(teacher), family.layers(student))):
        for name, child in s_layer.named_children():
            params = list(child.parameters())
            own = params and not any(id(p) in teacher_params for p in params)
            if own and name in ("self_attn", "mlp"):  # the new attention; a trained copy of the MLP
                made["trained"] += _shard(child)
        if shard_frozen:
            t_attn = family.attention(teacher, i)
            if s_layer.self_attn is not None and any(id(p) in teacher_params for p in s_layer.self_attn.parameters()):
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # shared with an unedited student layer
                    made["frozen"] += _shard(getattr(t_attn, proj, None))
            else:
                made["frozen"] += _shard(t_attn)
            if any(id(p) in teacher_params for p in t_layer.mlp.parameters()):
                made["frozen"] += _shard(t_layer.mlp)  # shared: the student's layer calls this very module
    return made


def check_trainable(which: str, shard_frozen: bool) -> None:
    if which == "all" and shard_frozen:
        raise AttnEditError(
            "stage2.trainable=all copies every teacher module into the student, which a sharded frozen teacher "
            "cannot give; use trainable=attention or attention+norms, or ATTNEDIT_FROZEN=replicate"
        )


def sync_replicated_grads(params: list[tuple[str, nn.Parameter]]) -> int:
    """Average over ranks the gradients of trained weights that no unit shards (norm copies, tied heads).

    A hook after each accumulation all-reduces the running gradient: averaging is linear, so after the
    last micro-batch it is the mean over ranks of the summed micro-batch gradients, as one process has.
    """
    from torch.distributed.tensor import DTensor

    n = 0
    for _, p in params:
        if isinstance(p, DTensor) or getattr(p, "_attnedit_synced", False):
            continue

        def hook(param):
            dist.all_reduce(param.grad)
            param.grad.div_(env.world_size())

        p.register_post_accumulate_grad_hook(hook)
        p._attnedit_synced = True
        n += 1
    return n


@torch.no_grad()
def gather_full(model: nn.Module, keep: bool) -> None:
    """Replace every sharded parameter by its full value (on every rank: the all-gather is collective).

    ``keep``: this rank holds on to the full values (rank 0, which saves the model); the others get
    empty placeholders. Call it once, when nothing runs the model forward any more.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                full = p.full_tensor()
                value = full if keep else full.new_empty(0)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    for module in model.modules():  # back to plain modules: no FSDP hooks or _apply from here on
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                if handle is not None:
                    handle.remove()
            module.__class__ = next(c for c in type(module).__bases__ if not issubclass(c, FSDPModule))
