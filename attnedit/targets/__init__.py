"""Target attentions and the edited model class.

Every file here is self-contained remote code: ``attnedit.export`` copies this folder's modules into
each saved checkpoint, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
without attnedit installed.
"""

from .caches import KVCacheLayer, SlidingKVCacheLayer, StaticKVCacheLayer, StaticSlidingKVCacheLayer
from .common import AttentionContext, RMSNorm, Rotary
from .configuration_attnedit import AttnEditConfig
from .dense import DenseAttention
from .gateswa import GateSWAAttention
from .gqa import GQAAttention
from .kernels import decode_attention, sliding_attention
from .mla import LatentCacheLayer, MLAAttention, StaticLatentCacheLayer
from .model_cache import AttnEditCache
from .modeling_attnedit import ATTENTION_CLASSES, AttnEditForCausalLM

REMOTE_CODE_FILES = (
    "caches.py",
    "common.py",
    "configuration_attnedit.py",
    "dense.py",
    "engine_options.py",
    "gateswa.py",
    "gqa.py",
    "kernels.py",
    "mla.py",
    "model_cache.py",
    "modeling_attnedit.py",
    "split_heads.py",
)

__all__ = [
    "ATTENTION_CLASSES",
    "AttentionContext",
    "AttnEditCache",
    "AttnEditConfig",
    "AttnEditForCausalLM",
    "DenseAttention",
    "GQAAttention",
    "GateSWAAttention",
    "KVCacheLayer",
    "LatentCacheLayer",
    "MLAAttention",
    "REMOTE_CODE_FILES",
    "RMSNorm",
    "Rotary",
    "SlidingKVCacheLayer",
    "StaticKVCacheLayer",
    "StaticLatentCacheLayer",
    "StaticSlidingKVCacheLayer",
    "decode_attention",
    "sliding_attention",
]
