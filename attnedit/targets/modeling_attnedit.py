"""The edited causal LM: the teacher's backbone with an attnedit attention in every layer.

The backbone (embeddings, decoder layers' norms and MLP/MoE blocks, final norm) is the teacher's own
transformers class, rebuilt from ``config.base_config``; each layer's ``self_attn`` is replaced by a
:class:`DenseAttention` (unedited), :class:`MLAAttention`, :class:`GateSWAAttention`, :class:`GQAAttention`
or an outside target's attention (``ATTENTION_CLASSES``; ``config.attention_code`` names the file of a kind
this code does not know). The forward loop is written here, so the caches are attnedit's own: MLA caches
only its latent, sliding layers keep a ring buffer, and the bytes they hold are what
``AttnEditCache.allocated_bytes`` reports. For the Llama/Qwen pre-norm layout the loop runs each layer's
norms, residuals and MLP itself (``backbone.layer = "prenorm"``); for any other layout
(``"teacher"``: Gemma's sandwich norms, OLMo 2's post-norm, Granite's residual multiplier) it calls the
teacher's own decoder layer, whose ``self_attn`` is the new attention (:class:`TeacherLayerCall`).

Weight names match the teacher's (``model.layers.N.mlp...``), so frozen weights load unchanged. The cache and
the bookkeeping of each call over it are ``model_cache.py``'s; the inference options (fused projections, compiled
prefill) ``engine_options.py``'s.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import AttentionContext, RMSNorm, checkpoint
from .configuration_attnedit import AttnEditConfig
from .dense import DenseAttention
from .engine_options import EngineOptions, post_attention, pre_attention
from .gateswa import GateSWAAttention
from .gqa import GQAAttention
from .kernels import prepare_sliding
from .mla import MLAAttention
from .model_cache import AttnEditCache, chunk_mask, context_without_cache

# the attention class of every layer kind; an outside target adds its own (attnedit.surgery.api.register_target)
ATTENTION_CLASSES: dict[str, type] = {c.kind: c for c in (DenseAttention, MLAAttention, GateSWAAttention, GQAAttention)}


def attention_class(kind: str, config=None) -> type:
    """The class of layer kind ``kind``: a registered one, else the one ``config.attention_code`` names
    (``"file.Class"``, a file of the checkpoint's folder, loaded as transformers loads remote code)."""
    if kind in ATTENTION_CLASSES:
        return ATTENTION_CLASSES[kind]
    code = (getattr(config, "attention_code", None) or {}).get(kind)
    if code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(code, config.name_or_path)
    raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(ATTENTION_CLASSES)}")


def layer_base_config(base_config: dict, spec: dict, layer_idx: int) -> dict:
    """The config an attention reads its RoPE from. A teacher whose RoPE differs per layer (Gemma 3: a local base
    for sliding layers, a global one for full layers) lists each layer's parameters in ``spec["layer_rope"]``;
    the layer then gets them as a plain (Llama-typed) config of its own."""
    rope = spec.get("layer_rope")
    if not rope:
        return base_config
    params = dict(rope[layer_idx])
    keep = ("hidden_size", "num_attention_heads", "max_position_embeddings", "original_max_position_embeddings")
    out = {k: base_config[k] for k in keep if k in base_config}
    return {**out, "model_type": "llama", "head_dim": spec["head_dim"], "rope_parameters": params, "rope_theta": params.get("rope_theta")}


def build_attention(layer: dict, spec: dict, base_config: dict, layer_idx: int, cls: type | None = None) -> nn.Module:
    args = {k: v for k, v in layer.items() if k != "kind"}
    cls = cls or attention_class(layer["kind"])
    base = layer_base_config(base_config, spec, layer_idx)
    if issubclass(cls, DenseAttention) and layer["kind"] == "dense":
        return cls(spec, base, layer_idx, window=args.get("window"), sink=args.get("sink", 0))
    return cls(spec, base, layer_idx, **args)


class TeacherLayerCall:
    """Mixed into an attention class so that the teacher's own decoder layer can call it: the layer calls
    ``self_attn(hidden_states=x, position_embeddings=..., attention_mask=..., ..., attnedit_context=ctx)``
    and unpacks ``(output, weights)``; attnedit ignores the teacher's masks and RoPE tables (the attention
    computes its own from ``ctx``). Called as ``attn(x, ctx)`` (stage 1, tests) it returns the output alone."""

    def forward(self, hidden_states=None, ctx=None, attnedit_context=None, **kwargs):
        if attnedit_context is None:
            return super().forward(hidden_states, ctx)
        return super().forward(hidden_states, attnedit_context), None


_TEACHER_CALLED: dict[type, type] = {}


def teacher_called(cls: type) -> type:
    """``cls`` with :class:`TeacherLayerCall` mixed in (one subclass per class, same name, same weights)."""
    if cls not in _TEACHER_CALLED:
        _TEACHER_CALLED[cls] = type(cls.__name__, (TeacherLayerCall, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _TEACHER_CALLED[cls]


def base_config_object(base_config: dict):
    """The teacher's config object, without the teacher's dtype: the backbone is built in the dtype the
    edited model is being built or loaded in (``from_pretrained(..., dtype=X)`` sets it), never the teacher's."""
    cfg = {k: v for k, v in base_config.items() if k not in ("dtype", "torch_dtype")}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


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
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0 - module.offset)
        elif "RMSNorm" in type(module).__name__:
            module.weight.fill_(1.0)
        if isinstance(module, GateSWAAttention) and module.g_proj is not None:
            module.g_proj.weight.zero_()


class AttnEditForCausalLM(EngineOptions, AttnEditPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # the most tokens (summed over the batch) a prefill into a cache processes at once; longer prompts (and
    # larger batches) run in chunks of the cache's rows and of the sequence, which bounds prefill memory; None: all at once
    prefill_chunk: int | None = 8192

    def __init__(self, config: AttnEditConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(base_config_object(config.base_config))
        teacher_layers = (getattr(config, "backbone", None) or {}).get("layer") == "teacher"
        for i, layer in enumerate(config.layer_attention):
            cls = attention_class(layer["kind"], config)
            cls = teacher_called(cls) if teacher_layers else cls
            self.model.layers[i].self_attn = build_attention(layer, config.teacher_attention, config.base_config, i, cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.checkpointed_layers: int | None = None  # under gradient checkpointing, the first layers recomputed; None: all
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

    def prepare_attention(self, t: int, device) -> None:
        """Build what the attention kernels look up for ``t`` new tokens starting at token 0 (FlexAttention's block
        masks for every sliding window) before compiled layers run: built inside a traced gradient checkpoint they
        would be a side effect dynamo refuses, and outside one they would be rebuilt in every compiled call."""
        windows = {(a.window, a.sink) for a in self.attentions() if isinstance(getattr(a, "window", None), int)}
        prepare_sliding(t, windows, device)

    def new_cache(self, static: bool = False, batch_size: int = 1, max_length: int | None = None, dtype=None, device=None) -> AttnEditCache:
        """A growing cache, or (``static=True``) one allocated once for ``batch_size`` x ``max_length`` tokens."""
        if not static:
            return AttnEditCache([attn.new_cache() for attn in self.attentions()])
        max_length = max_length or self.config.max_position_embeddings
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        layers = [attn.new_cache(True, batch_size, max_length, dtype, device) for attn in self.attentions()]
        return AttnEditCache(layers, static=True, batch_size=batch_size, max_length=max_length, device=device)

    @staticmethod
    def _layer(layer, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if isinstance(layer.self_attn, TeacherLayerCall):  # the teacher's own layer around the new attention
            out = layer(h, position_ids=ctx.position_ids, attnedit_context=ctx)
            return out[0] if isinstance(out, tuple) else out
        return post_attention(layer, h, layer.self_attn(pre_attention(layer, h), ctx))

    def _checkpointed_layer(self, layer, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """A decoder layer under gradient checkpointing (training code may route it elsewhere, as stage 2 does to a
        compiled layer that checkpoints inside its graph)."""
        return checkpoint(self._layer, layer, h, ctx)

    def _backbone(self, name: str, default=None):
        return (getattr(self.config, "backbone", None) or {}).get(name, default)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logit post-processing: division by ``logits_scaling`` (Granite), then
        ``final_logit_softcapping`` (Gemma 2/3: ``cap * tanh(logits / cap)``). Identity for most families."""
        divisor, cap = self._backbone("logits_scaling", 1.0), self._backbone("final_logit_softcapping")
        if divisor != 1.0:
            logits = logits / divisor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        tokens = inputs_embeds if inputs_embeds is not None else input_ids
        b, t = tokens.shape[:2]
        chunk = self.prefill_chunk
        if cache is not None and chunk and b * t > chunk and t > 1 and labels is None and not output_hidden_states and not torch.is_grad_enabled():
            logits = self._prefill_in_chunks(input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep)
            return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})
        return self._forward(input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, output_hidden_states, logits_to_keep)

    def _forward(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache, labels=None, output_hidden_states=None, logits_to_keep: int | None = 0
    ) -> CausalLMOutputWithPast:
        """One pass over the given tokens; ``logits_to_keep=None`` computes no logits (a prefill chunk whose
        positions nobody reads)."""
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
        if self._backbone("embedding_multiplier", 1.0) != 1.0:  # Granite
            h = h * self._backbone("embedding_multiplier")
        b, t = h.shape[:2]
        if cache is not None:
            ctx = cache.begin(b, t, attention_mask, position_ids, h.device)
        else:
            ctx = context_without_cache(b, t, attention_mask, position_ids, h.device)
        if t > 1 and ctx.key_padding is None:
            self.prepare_attention(t, h.device)
        hidden_states = [] if output_hidden_states else None
        compiled_prefill = self.prefill_backend is not None and t > 1 and not torch.is_grad_enabled() and self._backbone("layer") != "teacher"
        recompute = len(self.model.layers) if self.checkpointed_layers is None else self.checkpointed_layers
        for i, layer in enumerate(self.model.layers):
            if hidden_states is not None:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training and i < recompute:
                h = self._checkpointed_layer(layer, h, ctx)
            elif compiled_prefill and self.prefill_backend is not None:
                h = self._layer_prefill(layer, h, ctx)
            else:
                h = self._layer(layer, h, ctx)
        if cache is not None:
            cache.end(ctx)
        if logits_to_keep is None:
            return CausalLMOutputWithPast(logits=None, **{_CACHE_FIELD: cache})
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        h = self.model.norm(h[:, keep] if hidden_states is None else h)
        if hidden_states is not None:
            hidden_states.append(h)
            h = h[:, keep]
        logits = self.scale_logits(self.lm_head(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **{_CACHE_FIELD: cache},
        )

    def _prefill_in_chunks(self, input_ids, inputs_embeds, attention_mask, position_ids, cache: AttnEditCache, logits_to_keep: int):
        """A long prompt's prefill in pieces of at most :attr:`prefill_chunk` tokens (summed over the batch), so
        its working memory stays bounded whatever the prompt's length or the batch: with a static cache one
        sequence group at a time (rows of the cache written in place, as a server prefills one request at a time)
        and each in chunks along the sequence; a growing cache advances every row together. Logits are computed
        for the kept positions only. The result equals the prefill in one piece (tested)."""
        tokens = inputs_embeds if inputs_embeds is not None else input_ids
        b, t = tokens.shape[:2]
        budget = self.prefill_chunk
        n_before = cache.get_seq_length()
        if cache.static:
            length = min(t, budget)
            rows = max(1, min(b, budget // length))
        else:
            length, rows = max(1, budget // b), b
        keep_from = t - logits_to_keep if logits_to_keep else 0
        groups = []
        for i in range(0, b, rows):
            j = min(b, i + rows)
            part = cache if rows == b else cache.rows(i, j)
            pieces = []
            for s in range(0, t, length):
                e = min(t, s + length)
                keep = e - max(s, keep_from) if e > keep_from else None
                out = self._forward(
                    None if input_ids is None else input_ids[i:j, s:e],
                    None if inputs_embeds is None else inputs_embeds[i:j, s:e],
                    chunk_mask(attention_mask, i, j, n_before, s, e, t, cache.static),
                    None if position_ids is None else position_ids[i : j if position_ids.shape[0] > 1 else None, ..., s:e],
                    part,
                    logits_to_keep=keep,
                )
                if out.logits is not None:
                    pieces.append(out.logits)
            groups.append(torch.cat(pieces, dim=1))
            if part is not cache:
                cache.padded = cache.padded or part.padded
        if rows < b:
            cache.n_cached_device.add_(t)
        return torch.cat(groups, dim=0)

    # ------------------------------------------------------------------------------- generation
    # attnedit supplies its own cache (as Mamba-style models do): `generate()` allocates a static
    # attnedit cache for the whole generation (unless `cache_implementation="dynamic"` asks for a growing
    # one), hands it to transformers as a user cache, and transformers then compiles the one-token step
    # (`torch.compile`, CUDA graphs) on a GPU, as it does for its own static caches.

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def generate(self, inputs=None, generation_config=None, **kwargs):
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        config = generation_config if generation_config is not None else self.generation_config
        implementation = kwargs.pop("cache_implementation", getattr(config, "cache_implementation", None))
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if given is None and use_cache is not False:
            ids = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            if ids is None:
                raise ValueError("attnedit generate() needs input_ids (or inputs_embeds)")
            batch, length = ids.shape[0], ids.shape[1]
            rows = max(kwargs.get("num_beams", config.num_beams or 1), kwargs.get("num_return_sequences", config.num_return_sequences or 1))
            new = kwargs.get("max_new_tokens", config.max_new_tokens)
            total = length + new if new is not None else max(kwargs.get("max_length", config.max_length or 20), length + 1)
            static = implementation != "dynamic" and rows == 1
            cache = self.new_cache(static=static, batch_size=batch, max_length=total, device=ids.device)
            kwargs[_CACHE_FIELD] = cache
            kwargs.pop("past_key_values" if _CACHE_FIELD == "cache" else "cache", None)
        if getattr(config, "cache_implementation", None) is not None:
            import copy

            generation_config = copy.deepcopy(config)
            generation_config.cache_implementation = None
        return super().generate(inputs, generation_config=generation_config, **kwargs)

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
        if cache is not None and cache.static and getattr(cache, "_gen_len", None) == input_ids.shape[1] - 1:
            n_cached = input_ids.shape[1] - 1  # a decode step: no host read of the device count
        else:
            n_cached = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            cache._gen_len = input_ids.shape[1]
        inputs = {"use_cache": use_cache, _CACHE_FIELD: cache}
        if inputs_embeds is not None and n_cached == 0:
            inputs["inputs_embeds"] = inputs_embeds
            t = inputs_embeds.shape[1]
        else:
            # contiguous, as transformers' own models pass it: a view's strides change as the sequence grows,
            # which would make a compiled step re-trace at every token
            inputs["input_ids"] = input_ids[:, n_cached:].clone(memory_format=torch.contiguous_format)
            t = inputs["input_ids"].shape[1]
        if attention_mask is not None:
            # a static cache keeps the mask of earlier tokens itself: pass only the new tokens' columns, so
            # the compiled step sees the same shapes at every step
            static = cache is not None and cache.static
            inputs["attention_mask"] = attention_mask[:, -t:].clone(memory_format=torch.contiguous_format) if static else attention_mask
        if position_ids is not None and not (cache is not None and cache.static):
            inputs["position_ids"] = position_ids[..., -t:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs
