"""The one memory model: the bytes one process needs for a stage, from configs alone (no weights are read).

Per stage and process: frozen weights (the teacher, shared with the student: replicated, or under FSDP2
sharded per decoder layer when replicated ones do not fit), trained weights (fp32 master copies), their
gradients (fp32), AdamW's two fp32 moments, the activations one micro-batch keeps for the backward pass
(each stage's own estimate, ``Stage.activation_bytes`` in ``attnedit/stages/``), and FSDP2's buffers (the
all-gathered unit in use and the prefetched next one). Trained weights, gradients and AdamW state are
split over the processes; frozen ones only when sharded.

``peak`` is the sum: the estimate of the allocator's peak (``torch.cuda.max_memory_allocated``), which
``summary.json`` reports next to the measured one. What must fit a GPU (``total``) adds 10% allocator
slack and 1 GiB of CUDA context. When a stage's ``total`` is above the GPU's memory, :func:`fit` picks
the largest micro-batch that fits and raises gradient accumulation to keep the recipe's global batch,
turning gradient checkpointing on (a stage that has it) only where no micro-batch fits without it.

The strategy (:class:`~attnedit.distributed.Parallelism`) says how the weights are laid out (:class:`Layout`);
the stages say what they train and keep (:class:`StageLoad`); this module adds them up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..errors import AttnEditError

GiB = 1024**3
FP32 = 4  # bytes of an fp32 value: trained weights are fp32 master copies, and so are their gradients and AdamW's moments
CONTEXT_BYTES = 1.0 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers
SLACK = 0.10  # allocator fragmentation, on top of the estimate
SCORE_TENSORS = 2  # t x t tensors per head (scores and probabilities) on the CPU, which has no fused attention kernel


_cap_bytes: int | None = None  # set by cap_gpu_memory: the share of each GPU this process may use


def device_memory(device: torch.device) -> int | None:
    """The GPU's total memory (``torch.cuda.mem_get_info``), or the cap :func:`cap_gpu_memory` set where that is
    smaller; None on other devices, where nothing is fitted."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    total = int(torch.cuda.mem_get_info(device)[1])
    return total if _cap_bytes is None else min(total, _cap_bytes)


def cap_gpu_memory(gib: float) -> None:
    """Use at most ``gib`` GiB of this process's GPU: the stages are fitted to it and the caching allocator
    refuses to go past it (``torch.cuda.set_per_process_memory_fraction``), as on a smaller card or a shared one."""
    global _cap_bytes
    if not torch.cuda.is_available():
        raise AttnEditError("--gpu-memory caps a GPU and this machine has none; use it with --dry-run to plan for one")
    total = int(torch.cuda.mem_get_info()[1])
    shown = math.ceil(total / GiB * 10) / 10  # the card as a size is read off it: 79.2 for an H100's 79.18 GiB
    if not 0 < gib <= shown:
        raise AttnEditError(f"--gpu-memory {gib:g} is not within this GPU's {total / GiB:.2f} GiB; give a size in GiB up to {shown:g}")
    cap = min(int(gib * GiB), total)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    _cap_bytes = cap


def score_bytes(device: torch.device, batch: int, heads: int, seq: int, abytes: int) -> int:
    """The attention scores one layer keeps for backward: none on a GPU (fused kernels), ``t x t`` per head on the CPU."""
    return batch * heads * seq * seq * SCORE_TENSORS * abytes if device.type == "cpu" else 0


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the teacher by kind, and of the edited model's new attention."""

    embed: int
    head: int
    attention: int
    mlp: int
    norms: int
    largest_layer_frozen: int  # the largest decoder layer's frozen attention + MLP (a sharded frozen unit)
    new_attention: int
    largest_new: int  # the largest new attention (a trained FSDP2 unit)

    @property
    def teacher(self) -> int:
        return self.embed + self.head + self.attention + self.mlp + self.norms


def model_sizes(config, edited) -> ModelSizes:
    """Count the teacher's parameters (``config``) and the edited model's new attention (``edited``) on the meta device."""
    from transformers import AutoModelForCausalLM

    from ..targets import AttnEditForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        student = AttnEditForCausalLM(edited)
    parts = {"embed": 0, "head": 0, "attention": 0, "mlp": 0, "norms": 0}
    seen, per_layer = set(), {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if ".self_attn." in name and "norm" not in name:
            kind = "attention"
        elif ".mlp." in name:
            kind = "mlp"
        elif "embed_tokens" in name:
            kind = "embed"
        elif name.startswith("lm_head"):
            kind = "head"
        else:
            kind = "norms"
        parts[kind] += n
        if kind in ("attention", "mlp"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + n
    new = [sum(p.numel() for p in student.attentions()[i].parameters()) for i in edited.edit["edited_layers"]]
    return ModelSizes(**parts, largest_layer_frozen=max(per_layer.values(), default=0), new_attention=sum(new), largest_new=max(new, default=0))


@dataclasses.dataclass(frozen=True)
class StageLoad:
    """What one stage asks of memory: what it trains and what a micro-batch keeps (from its Stage object)."""

    stage: int
    trained: int  # trained parameters
    seq_len: int
    batch_size: int  # the recipe's micro-batch: sequences per forward, all processes together
    grad_accum: int
    gradient_checkpointing: bool | None  # the stage's setting; None: the stage has no such switch
    activations: Callable[[int, int], float]  # bytes one process keeps for backward at m sequences, n layers recomputed
    layers: int = 0  # the decoder layers gradient checkpointing may recompute

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def recomputed(self, checkpointing: bool | int | None = None) -> int | None:
        """Layers recomputed under ``checkpointing`` (default: the stage's setting): True all of them, False none,
        an int that many (the first ones); None for a stage without the switch."""
        if self.gradient_checkpointing is None:
            return None
        setting = self.gradient_checkpointing if checkpointing is None else checkpointing
        return self.layers if setting is True else 0 if setting is False else max(0, min(int(setting), self.layers))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a strategy lays the weights out: over how many processes, frozen weights sharded or not,
    FSDP2 units (whose all-gather buffers count)."""

    world: int = 1
    shard_frozen: bool = False
    fsdp_units: bool = False

    @property
    def frozen(self) -> str:
        return "shard" if self.shard_frozen else "replicate"


TERMS = ("frozen_weights", "trained_weights", "grads", "optimizer", "activations", "buffers")


def stage_bytes(
    sizes: ModelSizes, load: StageLoad, layout: Layout, wbytes: int, batch_size: int | None = None, checkpointing: bool | int | None = None
) -> dict:
    """One process's bytes for a stage at ``batch_size`` sequences per micro-step (all processes together;
    default: the recipe's) with gradient checkpointing ``checkpointing`` (True: every layer recomputed, False: none,
    an int: that many; default: the stage's setting)."""
    n = layout.world
    batch = load.batch_size if batch_size is None else batch_size
    recomputed = load.recomputed(checkpointing)
    micro = max(1, batch // n)
    whole = (sizes.embed + sizes.head + sizes.norms) * wbytes
    layered = (sizes.attention + sizes.mlp) * wbytes
    sharded_frozen = layout.shard_frozen and n > 1
    row = {
        "stage": load.stage,
        "micro_batch": micro,
        "seq_len": load.seq_len,
        "batch_size": batch,
        "grad_accum": load.global_batch // batch,
        "gradient_checkpointing": None if recomputed is None else recomputed > 0,
        "recomputed_layers": recomputed,
        "layers": load.layers,
        "frozen_weights": whole + (layered / n if layout.shard_frozen else layered),
        "trained_weights": load.trained * FP32 / n,
        "grads": load.trained * FP32 / n,
        "optimizer": load.trained * 2 * FP32 / n,
        "activations": load.activations(micro, recomputed or 0),
        "buffers": 2 * (sizes.largest_new * FP32 + (sizes.largest_layer_frozen * wbytes if sharded_frozen else 0)) if layout.fsdp_units else 0,
    }
    row["peak"] = sum(row[k] for k in TERMS)
    row["total"] = row["peak"] * (1 + SLACK) + CONTEXT_BYTES
    return row


def checkpointing_text(row: dict) -> str:
    """ "gradient checkpointing on", and where it recomputes only some of the layers, "... on the first n of N layers"."""
    n, layers = row.get("recomputed_layers"), row.get("layers")
    return f"gradient checkpointing on the first {n} of {layers} layers" if n is not None and 0 < n < layers else "gradient checkpointing on"


def fits(row: dict, gpu_bytes: float | None) -> bool:
    return gpu_bytes is None or row["total"] <= gpu_bytes


def micro_batches(load: StageLoad, world: int) -> list[int]:
    """The micro-batches that keep the recipe's global batch, largest first: divisors of it, at most the
    recipe's, that split evenly over ``world`` processes (the recipe's own first, whatever it is)."""
    g = load.global_batch
    return [load.batch_size] + [b for b in range(load.batch_size - 1, 0, -1) if g % b == 0 and b % world == 0]


def fit_order(load: StageLoad, world: int) -> list[tuple[int, int | None]]:
    """The (micro-batch, layers recomputed) settings :func:`fit` tries, in order. A stage that asks for gradient
    checkpointing recomputes every layer, at every micro-batch, largest first; one without the switch the same
    with None. A stage where it is off tries every micro-batch with no recomputation, then with the first layer
    recomputed, and so on up to all of them: the fewest layers recomputed first (each costs the layer's forward
    again), then the largest micro-batch."""
    batches = micro_batches(load, world)
    if load.gradient_checkpointing is None:
        return [(batch, None) for batch in batches]
    counts = [load.layers] if load.gradient_checkpointing else range(load.layers + 1)
    return [(batch, n) for n in counts for batch in batches]


def fit(sizes: ModelSizes, load: StageLoad, layout: Layout, wbytes: int, gpu_bytes: float | None) -> dict | None:
    """The row of the first setting in :func:`fit_order` that fits ``gpu_bytes`` (the recipe's when it fits):
    the largest micro-batch, and where the stage may recompute, the fewest layers recomputed; None when nothing
    fits."""
    for batch, recomputed in fit_order(load, layout.world):
        row = stage_bytes(sizes, load, layout, wbytes, batch, recomputed)
        if fits(row, gpu_bytes):
            return row
    return None


def adapted(row: dict, load: StageLoad) -> bool:
    """Whether a fitted row changes what the recipe asks (micro-batch, layers recomputed)."""
    return row["batch_size"] != load.batch_size or row["recomputed_layers"] != load.recomputed()
