"""The edited causal LM: the teacher's backbone with an attnedit attention in every layer.

The backbone (embeddings, decoder layers' norms and MLP/MoE blocks, final norm) is the teacher's own
transformers class, rebuilt from ``config.base_config``; each layer's ``self_attn`` is replaced by a
:class:`DenseAttention` (unedited), :class:`MLAAttention` or :class:`GateSWAAttention`. The forward
loop is written here, so the caches are attnedit's own: MLA caches only its latent, sliding layers
keep a ring buffer, and the bytes they hold are what ``AttnEditCache.allocated_bytes`` reports.

Weight names match the teacher's (``model.layers.N.mlp...``), so frozen weights load unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import AttentionContext, RMSNorm
from .configuration_attnedit import AttnEditConfig
from .dense import DenseAttention
from .gateswa import GateSWAAttention
from .mla import MLAAttention


def build_attention(layer: dict, spec: dict, base_config: dict, layer_idx: int) -> nn.Module:
    args = {k: v for k, v in layer.items() if k != "kind"}
    kind = layer["kind"]
    if kind == "dense":
        return DenseAttention(spec, base_config, layer_idx, window=args.get("window"), sink=args.get("sink", 0))
    if kind == "mla":
        return MLAAttention(spec, base_config, layer_idx, **args)
    if kind == "gateswa":
        return GateSWAAttention(spec, base_config, layer_idx, **args)
    raise ValueError(f"unknown attention kind {kind!r} in layer {layer_idx}")


def base_config_object(base_config: dict):
    cfg = dict(base_config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class AttnEditCache(Cache):
    """One attnedit cache layer per model layer (full K/V, latent, or sliding ring buffer)."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def allocated_bytes(self) -> int:
        """Bytes of storage the cache tensors actually hold, summed over layers."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def crop(self, max_length: int):
        raise NotImplementedError("attnedit caches cannot be cropped (assisted decoding is not supported)")


# transformers renamed `past_key_values` to `cache` in 5.2x; name the output field as this version does
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class AttnEditPreTrainedModel(PreTrainedModel):
    config_class = AttnEditConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm) or "RMSNorm" in type(module).__name__:
            module.weight.fill_(1.0)
        if isinstance(module, GateSWAAttention) and module.g_proj is not None:
            module.g_proj.weight.zero_()


class AttnEditForCausalLM(AttnEditPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnEditConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(base_config_object(config.base_config))
        for i, layer in enumerate(config.layer_attention):
            self.model.layers[i].self_attn = build_attention(layer, config.attention, config.base_config, i)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def attentions(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

    def new_cache(self) -> AttnEditCache:
        return AttnEditCache([attn.new_cache() for attn in self.attentions()])

    @staticmethod
    def _layer(layer, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = h + layer.self_attn(layer.input_layernorm(h), ctx)
        m = layer.mlp(layer.post_attention_layernorm(h))
        if isinstance(m, tuple):  # some MoE blocks also return router logits
            m = m[0]
        return h + m

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: AttnEditCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: AttnEditCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
        b, t = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        key_padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attnedit models take a 2-D attention_mask [batch, tokens] (1 = real token)")
            if attention_mask.shape[1] != past + t:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens; expected past + new = {past + t}")
            if not bool(attention_mask.all()):
                key_padding = attention_mask.bool()
        if position_ids is None:
            if key_padding is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=h.device)[None].expand(b, t)
        elif position_ids.shape[-1] != t:
            position_ids = position_ids[..., -t:]
        ctx = AttentionContext(position_ids, past, t, key_padding, cache)
        hidden_states = [] if output_hidden_states else None
        for layer in self.model.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(self._layer, layer, h, ctx, use_reentrant=False)
            else:
                h = self._layer(layer, h, ctx)
        h = self.model.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        if cache is not None:
            cache.seen_tokens = past + t
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(h[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **{_CACHE_FIELD: cache},
        )

    # generation: attnedit supplies its own cache (like Mamba-style models do), so generate() works the
    # same on transformers versions that call the cache `past_key_values` and those that call it `cache`.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        cache=None,
        use_cache=True,
        position_ids=None,
        logits_to_keep=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, "past_key_values": cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            t = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, past:]
            t = inputs["input_ids"].shape[1]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -t:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs
