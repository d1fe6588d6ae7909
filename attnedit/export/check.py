"""The parity check every export gets: reload it as the serving side would and compare with attnedit.

* The export loads with ``AutoModelForCausalLM`` and ``trust_remote_code=False`` (stock formats), in
  float32 on the CPU, and its logits on a prompt longer than every sliding window are compared with
  the attnedit model's (also float32): the largest absolute difference is reported.
* A greedy generation of ``new_tokens`` tokens (32 by default, EOS suppressed) is identical token for
  token, through the stock cache.
* The stock cache, measured after that generation, holds the bytes the design says: the latent
  (``c_kv`` + rotated ``k_pe``, ``kv_lora_rank + qk_rope_head_dim`` values per token) for MLA as
  DeepSeek-V3; at most ``window`` tokens for sliding layers; every token for full layers. Bytes are
  those of the storage the cache's tensors keep alive (a view of a bigger tensor counts the bigger
  tensor). Stock ``DynamicSlidingWindowLayer`` keeps ``window - 1`` tokens visible between steps (the
  new token makes ``window``) inside a storage of exactly ``window`` tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import AttnEditError

LOGIT_TOLERANCE = 1e-4


@dataclass
class LayerCache:
    layer: int
    kind: str  # mla, full, sliding, heads (a sliding layer with some KV heads full)
    tokens: int  # tokens the design keeps for this layer
    visible: int  # tokens the stock cache tensors show
    stock_bytes: int
    designed_bytes: int
    teacher_bytes: int


@dataclass
class ParityReport:
    export: str
    stock_class: str
    remote_code: bool
    prompt_tokens: int
    new_tokens: int
    max_abs_logit_diff: float
    max_abs_logit: float
    greedy_match: bool
    first_mismatch: int | None
    cache_tokens: int
    layers: list[LayerCache] = field(default_factory=list)
    tolerance: float = LOGIT_TOLERANCE

    @property
    def stock_bytes(self) -> int:
        return sum(x.stock_bytes for x in self.layers)

    @property
    def designed_bytes(self) -> int:
        return sum(x.designed_bytes for x in self.layers)

    @property
    def teacher_bytes(self) -> int:
        return sum(x.teacher_bytes for x in self.layers)

    @property
    def cache_ok(self) -> bool:
        return all(x.stock_bytes == x.designed_bytes for x in self.layers)

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff < self.tolerance and self.greedy_match and self.cache_ok

    def summary(self) -> str:
        kinds = {}
        for x in self.layers:
            kinds.setdefault(x.kind, set()).add((x.tokens, x.visible))
        per_kind = "; ".join(
            f"{k} layers {', '.join(f'{t} tokens' + (f' ({v} visible)' if v != t else '') for t, v in sorted(s))}" for k, s in sorted(kinds.items())
        )
        gen = "identical" if self.greedy_match else f"DIFFERENT from token {self.first_mismatch}"
        cache = "=" if self.cache_ok else "!="
        return "\n".join(
            [
                f"parity: {self.stock_class} ({'remote code' if self.remote_code else 'stock, trust_remote_code=False'}) "
                f"vs attnedit, float32 CPU, {self.prompt_tokens}-token prompt",
                f"  logits: max |diff| {self.max_abs_logit_diff:.3e} (largest |logit| {self.max_abs_logit:.1f}; limit {self.tolerance:.0e})",
                f"  greedy {self.new_tokens} tokens: {gen}",
                f"  cache after {self.cache_tokens} tokens: {self.stock_bytes:,} bytes {cache} designed "
                f"{self.designed_bytes:,} ({100 * self.stock_bytes / max(1, self.teacher_bytes):.1f}% of the teacher's "
                f"{self.teacher_bytes:,}); {per_kind}",
                f"  result: {'PASS' if self.ok else 'FAIL'}",
            ]
        )

    def to_json(self) -> str:
        d = asdict(self)
        d.update(stock_bytes=self.stock_bytes, designed_bytes=self.designed_bytes, teacher_bytes=self.teacher_bytes, cache_ok=self.cache_ok, ok=self.ok)
        return json.dumps(d, indent=2)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _layer_tensors(layer) -> list[torch.Tensor]:
    if hasattr(layer, "tensors"):  # attnedit cache layer (the hf export's remote code)
        return layer.tensors()
    return [getattr(layer, "keys", None), getattr(layer, "values", None)]


def designed_layer(config, i: int, tokens: int, batch: int, nbytes: int) -> tuple[str, int, int, int]:
    """(kind, tokens kept, designed bytes, teacher bytes) for layer ``i`` of an attnedit config; the bytes are
    ``eval/kv.py``'s figures (the layer's target's analytic size) at ``tokens`` tokens."""
    from ..eval.kv import kv_layout, slides

    spec = config.teacher_attention
    layer = config.layer_attention[i]
    teacher = tokens * 2 * spec["num_kv_heads"] * spec["head_dim"] * batch * nbytes
    designed = round(kv_layout(config, tokens)[i].values_per_token * tokens) * batch * nbytes
    sliding = slides(layer)
    kept = min(tokens, int(layer["window"]) + int(layer.get("sink", 0) or 0)) if sliding else tokens
    kind = "mla" if layer["kind"] == "mla" else "full" if not sliding else "heads" if layer.get("full_kv_heads") else "sliding"
    return kind, kept, designed, teacher


def default_context(model) -> int:
    """A prompt longer than every sliding window (so the window is exercised), at least 64 tokens."""
    windows = [int(x["window"]) + int(x.get("sink", 0) or 0) for x in model.config.layer_attention if x.get("window")]
    return max([64] + [w + 32 for w in windows])


@torch.no_grad()
def check_export(
    model,
    export_dir,
    context: int | None = None,
    new_tokens: int = 32,
    remote_code: bool = False,
    tolerance: float = LOGIT_TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """Load ``export_dir`` (stock classes unless ``remote_code``) and compare it with ``model``; see the module doc."""
    from transformers import AutoModelForCausalLM

    ref = model
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        ref = copy.deepcopy(model).to("cpu", torch.float32)
    ref.eval()
    try:
        stock = AutoModelForCausalLM.from_pretrained(Path(export_dir), dtype=torch.float32, trust_remote_code=remote_code).eval()
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        raise AttnEditError(f"the export at {export_dir} does not load with stock transformers: {e}") from None
    context = context or default_context(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, context), generator=g)
    a = ref(ids).logits.float()
    b = stock(ids).logits.float()
    diff = (a - b).abs().max().item()
    gen = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id or 0,
    )
    out_ref = ref.generate(ids, **gen)
    out_stock = stock.generate(ids, **gen)
    s_ref, s_stock = out_ref.sequences, out_stock.sequences
    match = s_ref.shape == s_stock.shape and torch.equal(s_ref, s_stock)
    first = None
    if not match:
        n = min(s_ref.shape[1], s_stock.shape[1])
        bad = (s_ref[0, :n] != s_stock[0, :n]).nonzero()
        first = int(bad[0, 0]) - context if len(bad) else n - context
    cache = getattr(out_stock, "cache", None) or getattr(out_stock, "past_key_values", None)
    cache_tokens = s_stock.shape[1] - 1  # the last generated token is never fed back
    # a static cache (attnedit's generate() default) is allocated once for the whole generation
    held = cache.max_length if getattr(cache, "static", False) else cache_tokens
    layers = []
    for i, layer in enumerate(cache.layers):
        tensors = _layer_tensors(layer)
        kind, kept, designed, teacher = designed_layer(model.config, i, held, 1, 4)
        visible = max((t.shape[-2] for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 2), default=0)
        layers.append(LayerCache(i, kind, kept, visible, _storage_bytes(tensors), designed, teacher))
    return ParityReport(
        export=str(export_dir),
        stock_class=type(stock).__name__,
        remote_code=remote_code,
        prompt_tokens=context,
        new_tokens=new_tokens,
        max_abs_logit_diff=diff,
        max_abs_logit=a.abs().max().item(),
        greedy_match=match,
        first_mismatch=first,
        cache_tokens=cache_tokens,
        layers=layers,
        tolerance=tolerance,
    )
