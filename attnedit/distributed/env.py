"""The process group from torchrun's environment, and rank/world helpers that are no-ops in one process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    NCCL when this process drives a GPU, gloo on CPUs. Each process takes the GPU ``LOCAL_RANK``, so
    ``cuda`` means that GPU from here on. Returns whether a process group is active.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=int(os.environ.get("ATTNEDIT_DIST_TIMEOUT", 1800)))
    dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout)
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mesh():
    """The 1-D device mesh over every rank (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(kind, (world_size(),))


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean over ranks of each tensor (one collective for all of them)."""
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64 if dist.get_backend() == "gloo" else torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].reshape(t.shape).to(t.dtype))
        at += t.numel()
    return out


def local_value(t):
    """A DTensor's full value (a replicated scalar such as a gradient norm), any other tensor unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
