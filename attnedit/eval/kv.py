"""KV-cache accounting: what each layer caches per token, analytically and as actually allocated.

Analytic figures come from the model's config alone (teachers included) and, for edited layers, from their
target's :meth:`~attnedit.surgery.api.Target.cache_values`; measured figures come from running a prefill with
attnedit's real cache and summing the storage its tensors hold. A test checks that the two agree exactly. This
module is the one source of KV sizes: ``inspect``, ``edit``, the ``--dry-run`` plan, ``bench``, the model card
and the KV figures ``convert`` writes into ``summary.json`` (which ``report`` reads) all come from
:func:`cache_bytes`, which names the dtype it counts in: the model's own (its config's ``dtype``: what ``edit``
and ``convert`` saved it in) unless a command runs it in another (``bench --dtype``), and bf16 only for a config
that names none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..surgery.api import dense_parameters, dense_values

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class LayerKV:
    layer: int
    kind: str  # dense | dense-sliding, or the target's label: mla | mla-sliding | gateswa-sliding | gateswa-full | gateswa-heads | gqa ...
    params: int  # attention parameters of this layer
    values_per_token: float  # cached values per token at the given context (K and V, or latent + rope key)
    bytes_per_token: float


def slides(layer: dict) -> bool:
    """Whether a layer (an entry of ``config.layer_attention``) attends over a window of recent tokens: any
    target's layer that carries a ``window``, unless it says it is one of a hybrid's full layers."""
    return layer.get("window") is not None and layer.get("layer_type") != "full"


def dtype_bytes(config, default: str = "bfloat16", override: str | None = None) -> tuple[str, int]:
    """The cache's dtype and bytes per cached value: ``override``, else the config's dtype, else ``default`` (bf16)."""
    name = override or getattr(config, "dtype", None) or default
    name = str(name).replace("torch.", "")
    if name not in DTYPE_BYTES:
        name = default
    return name, DTYPE_BYTES[name]


@dataclass(frozen=True)
class CacheBytes:
    """A model's KV-cache bytes per token at a context, and the dtype they are counted in."""

    dtype: str
    context: int
    per_token: float

    def __str__(self) -> str:
        from ..tables import human_bytes

        return f"{human_bytes(self.per_token)}/token ({self.dtype})"


def cache_bytes(config, context: int, dtype: str | None = None) -> CacheBytes:
    """Bytes per token the KV cache of ``config`` holds at ``context`` tokens, in ``dtype`` (default: the
    model's own, see :func:`dtype_bytes`): the one figure every command prints, with its dtype."""
    name, _ = dtype_bytes(config, override=dtype)
    return CacheBytes(name, context, sum(x.bytes_per_token for x in kv_layout(config, context, name)))


def _teacher_layers(config) -> list[dict]:
    from ..families import family_for

    family = family_for(config)
    spec = family.attention_spec(config)
    layers = []
    for i in range(config.num_hidden_layers):
        layers.append({"kind": "dense", "window": family.window(config, i), "spec": spec})
    return layers


def _attention_params(spec: dict, layer: dict) -> int:
    from ..surgery.api import target_of_kind

    if layer["kind"] == "dense":
        return dense_parameters(spec)
    return target_of_kind(layer["kind"]).parameters(layer, spec)


def kv_layout(config, context: int, dtype: str | None = None) -> list[LayerKV]:
    """Per-layer KV figures for a teacher config or an edited (``attnedit``) config at ``context`` tokens."""
    if context < 1:
        raise ValueError("context must be >= 1")
    _, nbytes = dtype_bytes(config, override=dtype)
    if getattr(config, "model_type", None) == "attnedit":
        spec = config.teacher_attention
        layers = config.layer_attention
    else:
        layers = _teacher_layers(config)
        spec = layers[0]["spec"]
    from ..surgery.api import target_of_kind

    out = []
    for i, layer in enumerate(layers):
        if layer["kind"] == "dense":  # the teacher's own attention
            window = layer.get("window")
            values = dense_values(spec["num_kv_heads"], spec["head_dim"], window, layer.get("sink", 0), context)
            label = "dense" if window is None else "dense-sliding"
        else:
            target = target_of_kind(layer["kind"])
            values, label = float(target.cache_values(layer, spec, context)), target.cache_label(layer)
        out.append(LayerKV(i, label, _attention_params(spec, layer), values, values * nbytes))
    return out


def kv_summary(config, context: int, dtype: str | None = None) -> dict:
    size = cache_bytes(config, context, dtype)
    layers = kv_layout(config, context, size.dtype)
    return {
        "context": context,
        "dtype": size.dtype,
        "layers": [asdict(x) for x in layers],
        "kv_bytes_per_token": size.per_token,
        "kv_bytes_total": size.per_token * context,
        "attention_params": sum(x.params for x in layers),
    }


def max_context(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    base = getattr(config, "base_config", None)
    if isinstance(base, dict) and base.get("max_position_embeddings"):
        return int(base["max_position_embeddings"])
    return getattr(config, "max_position_embeddings", None)


def usable_context(config, context: int) -> int:
    """``context``, or the model's longest if that is shorter: KV figures at a context the model cannot run
    would promise a saving it never gives."""
    limit = max_context(config)
    return min(context, limit) if limit else context


def kv_by_context(config, contexts: list[int], dtype: str) -> dict:
    return {
        "contexts": list(contexts),
        "bytes_per_token": [cache_bytes(config, c, dtype).per_token for c in contexts],
    }


def analytic_cache_bytes(config, context: int, batch: int, dtype: str) -> int:
    """What the cache of ``batch`` sequences of ``context`` tokens should hold, from the config alone."""
    return round(cache_bytes(config, context, dtype).per_token * context) * batch


def kv_figures(config, teacher_config, dtype: str) -> dict:
    """KV bytes per token of an edited model and its teacher in ``dtype`` (the dtype the model is saved and
    run in) at powers of two from 128 up to the max context, in the layout of ``bench.json``'s ``kv`` (what
    ``convert`` writes into ``summary.json``)."""
    limit = max_context(config) or 32768
    contexts = [2**k for k in range(7, int(math.log2(limit)) + 1)] or [limit]
    out = {"dtype": dtype, "student": kv_by_context(config, contexts, dtype), "teacher": kv_by_context(teacher_config, contexts, dtype)}
    out["ratio"] = [s / t for s, t in zip(out["student"]["bytes_per_token"], out["teacher"]["bytes_per_token"])]
    return out


@torch.no_grad()
def measured_cache_bytes(model, context: int, batch: int = 1, chunk: int | None = None) -> int:
    """Run ``context`` random tokens through an edited model with its real cache; return allocated bytes.

    With ``chunk`` the prefill runs in pieces (then single tokens), exercising the decode paths too.
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    cache = model.new_cache()
    step = chunk or context
    for start in range(0, context, step):
        model(input_ids=ids[:, start : start + step], past_key_values=cache, use_cache=True)
    return cache.allocated_bytes()
