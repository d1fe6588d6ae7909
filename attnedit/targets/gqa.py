"""GQA head reduction: the teacher's attention with fewer key/value heads.

Every query head keeps its projection; the teacher's KV heads are merged into ``num_kv_heads`` groups of
consecutive heads (query head ``i`` reads KV head ``i // (num_heads / num_kv_heads)``, as in any GQA model),
so the cache holds ``2 * num_kv_heads * head_dim`` values per token and layer instead of the teacher's
``2 * teacher_kv_heads * head_dim``. Everything else (RoPE, QK-norm, biases, score scale and soft-capping,
the teacher's own sliding window) is the teacher's: a converted model is the teacher's architecture with a
smaller ``num_key_value_heads``, which ``attnedit export`` writes as a stock checkpoint (no remote code).
How the merged heads start from the teacher's: ``attnedit/surgery/gqa.py``.
"""

from __future__ import annotations

from .dense import DenseAttention


class GQAAttention(DenseAttention):
    """:class:`DenseAttention` with ``num_kv_heads`` key/value heads instead of the teacher's."""

    kind = "gqa"

    def __init__(self, spec: dict, base_config: dict, layer_idx: int, num_kv_heads: int, window: int | None = None, sink: int = 0):
        if spec["num_heads"] % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide the {spec['num_heads']} query heads")
        super().__init__({**spec, "num_kv_heads": num_kv_heads}, base_config, layer_idx, window=window, sink=sink)
