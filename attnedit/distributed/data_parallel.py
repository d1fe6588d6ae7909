"""How a stage runs on N ranks (the FSDP2 strategy, :mod:`.strategy`): data-parallel, for both stages.

Every rank draws the same global batch from the same stream (same seed, same position: resume and a
change of world size stay exact) and trains on its own contiguous slice of ``batch_size / N``
sequences. Gradients are averaged over ranks (FSDP2's reduce-scatter for the sharded units, an
all-reduce for the rest), so an optimizer step sees the gradient of the whole global batch, as one
process does. The logged loss and per-layer figures are averaged over ranks too (one small all-reduce
per micro-batch), so ``metrics.jsonl`` reads as one process's.

Why stage 1 splits the data and not the layers: the edited layers are independent given the teacher's
activations, but those activations come from a teacher forward that costs most of a stage-1 step.
Splitting the layers, each rank would run that forward on the whole batch (up to its last layer), so
the dominant cost would not shrink with N; or one rank would run it and send every layer its ``x_i``
and ``y_i``: ``2 * B * T * hidden`` values per layer and micro-batch (Qwen3-8B, 8 x 2048 tokens,
bf16: 0.27 GB per layer, 9.7 GB per micro-batch). Splitting the data divides the teacher forward and
the student attentions by N and costs one gradient reduction per micro-batch over the *trained*
weights only: for Qwen3-8B -> MLA 1.4 G params, i.e. a reduce-scatter plus the next forward's
all-gather of 5.6 GB fp32 each, ring-wise ``2 (N-1)/N`` of that per rank, about 60 ms on NVLink
against seconds of compute.
"""

from __future__ import annotations

import torch

from . import env


class RankBatches:
    """This rank's slice of every global batch the stream gives."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def next_batch(self, batch_size: int) -> torch.Tensor:
        ids = self.stream.next_batch(batch_size)
        share = batch_size // self.world
        return ids[self.rank * share : (self.rank + 1) * share]

    def __getattr__(self, name):  # state_dict, load_state_dict, check, close, ... of the stream
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)


def reduced(loss_fn):
    """``loss_fn`` whose reported figures (loss, extras) are means over ranks; the returned loss, which
    is back-propagated, stays this rank's (its gradients are averaged by the reduction)."""

    def wrapped(ids):
        loss, extras = loss_fn(ids)
        keys = [k for k, v in extras.items() if isinstance(v, torch.Tensor)]
        means = env.all_reduce_mean([loss.detach(), *[extras[k] for k in keys]])
        return loss, {**extras, **dict(zip(keys, means[1:])), "loss": means[0]}

    return wrapped


@torch.no_grad()
def global_variances(ys: dict) -> dict:
    """Each layer's ``y.var()`` over the global batch (all ranks' slices), from one all-reduce of
    per-rank element counts, sums and sums of squares (fp64): stage 1 normalises by it, as one process does."""
    import torch.distributed as dist

    keys = list(ys)
    stats = torch.stack([torch.stack([torch.tensor(float(ys[i].numel()), dtype=torch.float64, device=ys[i].device),
                                      ys[i].double().sum(), ys[i].double().pow(2).sum()]) for i in keys])  # fmt: skip
    dist.all_reduce(stats)
    n, s, ss = stats.unbind(1)
    var = (ss - s * s / n) / (n - 1)
    return {i: var[k].float() for k, i in enumerate(keys)}
