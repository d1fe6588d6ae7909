"""OLMo 2 and OLMo 3: post-norm layers (no input norm: ``h + norm(attn(h))``, ``h + norm(mlp(h))``) run by the
teacher's own layer, and QK-norm over the whole q and k projections (before the heads are split). OLMo 3
adds sliding layers (``layer_types``) with a RoPE setting per layer type."""

from .base import Family

OLMO2 = Family(name="olmo2", model_types=("olmo2",), qk_norm="projection", layer="teacher")
OLMO3 = Family(name="olmo3", model_types=("olmo3",), qk_norm="projection", layer="teacher")
