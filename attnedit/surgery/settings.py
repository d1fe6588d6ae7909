"""Typed settings of each target, their defaults from the teacher's shapes, and their validation.

``attnedit edit --set key=value`` and a recipe's ``target_args`` fill the same dataclasses. Every
field has a one-line help (``metadata['help']``) that ``--help``/``--explain`` print. Which targets exist
and how each plans its layers is the target registry's (``api.py``): ``TARGETS`` and ``SETTINGS`` read it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from ..errors import AttnEditError
from ..schema import coerce
from .api import SETTINGS, TARGETS, LayerPlan, get_target  # noqa: F401 - SETTINGS, TARGETS: the registry's, re-exported


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class TargetSettings:
    layers: str = _help("layers to edit: 'all', or indices and ranges like '0-11,20'", "all")
    init: str = _help("how new attention weights start: 'random' (the paper's) or 'teacher'", "random")
    seed: int = _help("seed for random initialisation", 0)


@dataclass
class MLASettings(TargetSettings):
    kv_lora_rank: int | None = _help("latent size cached per token (default: a quarter of the teacher's K+V width)")
    q_lora_rank: int | None = _help("low-rank query bottleneck (default: none, a full q_proj)")
    qk_rope_head_dim: int | None = _help("size of the shared RoPE key (default: head_dim / 2)")
    qk_nope_head_dim: int | None = _help("per-head query/key size without RoPE (default: head_dim - rope dim)")
    v_head_dim: int | None = _help("per-head value size (default: the teacher's head_dim)")
    absorb: str = _help("decode with W_uk/W_uv absorbed: auto (when decoding), always, never", "auto")
    rope_theta: float | None = _help("RoPE base of the shared key (default: theta^(rope_dim/head_dim): the teacher's highest frequencies)")
    bias: str = _help(
        "biases on q_proj, kv_a_proj_with_mqa and o_proj: auto (when the teacher has q/k/v biases, e.g. Qwen2), true, false; export --format deepseek_v3 needs false",
        "auto",
    )
    rank_allocation: str = _help(
        "with init=teacher: 'uniform' (every layer kv_lora_rank) or 'auto' (the layers share kv_lora_rank x layers, "
        "each getting the rank its measured factorisation error asks for; the cache bytes are the same; export "
        "--format deepseek_v3 needs uniform)",
        "uniform",
    )
    init_weighting: str = _help(
        "with init=teacher: how the keys' and values' factorisation weighs the calibration tokens: 'tokens' (every "
        "token alike) or 'attention' (each by the square root of the attention the teacher's queries give it, so "
        "the keys and values that are read, the attention sink's most, are kept best)",
        "tokens",
    )


@dataclass
class GateSWASettings(TargetSettings):
    window: int | None = _help("tokens a sliding layer sees, itself included (default: 1024, at most a quarter of the max context)")
    sink: int = _help("first tokens every sliding layer always sees (attention sinks; 0 doubles perplexity)", 4)
    full_layers: str = _help(
        "full-attention layers: 'every:K' (layers K-1, 2K-1, ...), indices '3,9', 'none', 'auto:K' (the K layers "
        "whose windowing costs the teacher most, measured by convert on the run's data; see auto_score) or 'auto@F:L' "
        "(as many such layers as fit a KV cache of F times the teacher's at context L, e.g. auto@0.22:8192)",
        "every:6",
    )
    full_heads: str = _help(
        "KV heads kept full inside sliding layers (with their query heads; the layer's other KV heads slide): 'none', "
        "LAYER.HEAD pairs '3.0,7.1', 'auto:N' (the N KV heads whose windowing costs the teacher most, measured by "
        "convert) or 'auto@F:L' (as many as fit a KV cache of F times the teacher's at context L, e.g. "
        "auto@0.12:8192); not in layers where the teacher slides already; exports with remote code only (no stock "
        "format has a window per head)",
        "none",
    )
    auto_score: str = _help(
        "what an 'auto' choice of full layers or heads ranks by, measured on the teacher with each unit alone windowed: "
        "'kl' (mean KL over every position past the window) or 'recall' (that plus the mean KL where a span copied "
        "from further back than the window is predicted: the long-range targets of the run's own text)",
        "kl",
    )
    auto_seq_len: int | None = _help(
        "tokens per calibration block of an 'auto' choice (8 blocks of the run's data; default: the run's longest stage sequence length)"
    )
    gate: str = _help(
        "output gate: 'elementwise' (one per channel), 'headwise' (one per head) or 'none' (no gate: with sink=0 "
        "the model is a stock sliding-window architecture that `attnedit export` writes for vLLM/SGLang)",
        "elementwise",
    )
    gate_init: float = _help("initial gate value sigmoid(bias), in (0, 1): near 1 = open", 0.98)


def field_help(cls) -> list[tuple[str, str, object]]:
    return [(f.name, f.metadata.get("help", ""), f.default) for f in dataclasses.fields(cls)]


def field_types(cls) -> dict:
    """The fields' types of a settings dataclass, resolved (its annotations are strings)."""
    return typing.get_type_hints(cls)


def parse_settings(target: str, args: dict | None) -> TargetSettings:
    """Build the settings of ``target`` from a dict of overrides; unknown keys are an error."""
    cls = get_target(target).settings
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (args or {}).items():
        if key not in fields:
            raise AttnEditError(f"{target} has no setting {key!r}; known settings: {', '.join(fields)}")
        values[key] = coerce(key, value, field_types(cls)[key])
    return cls(**values)


def parse_layer_list(text, n_layers: int, what: str = "layers") -> list[int]:
    """'all', 'none', 'every:K', '0-11,20' or a list of ints -> sorted layer indices, validated."""
    if isinstance(text, (list, tuple)):
        items = [str(x) for x in text]
    else:
        text = str(text).strip().lower()
        if text == "all":
            return list(range(n_layers))
        if text in ("none", ""):
            return []
        if text.startswith("every:"):
            try:
                k = int(text.split(":", 1)[1])
            except ValueError:
                k = 0
            if k < 1:
                raise AttnEditError(f"{what}='{text}': 'every:K' needs an integer K >= 1")
            return [i for i in range(n_layers) if i % k == k - 1]
        items = [x for x in text.replace(" ", "").split(",") if x]
    out = set()
    for item in items:
        try:
            if "-" in item.lstrip("-"):
                lo, hi = (int(x) for x in item.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise AttnEditError(f"{what}: cannot read {item!r}; use 'all', indices like '0,3' or ranges like '0-11'") from None
    bad = sorted(i for i in out if not 0 <= i < n_layers)
    if bad:
        raise AttnEditError(f"{what}: layer {bad[0]} does not exist; the model has layers 0-{n_layers - 1}")
    return sorted(out)


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def teacher_theta(config, rope: dict | None = None) -> float:
    """The RoPE base of the teacher (``rope``: one layer's parameters, where they differ per layer)."""
    params = rope if rope is not None else (getattr(config, "rope_parameters", None) or {})
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def plan_mla(s: MLASettings, spec: dict, config, layer_rope: dict | None = None) -> dict:
    """Fill MLA defaults from the teacher's shapes and reject impossible ones (``layer_rope``: the layer's RoPE
    parameters, for teachers whose RoPE base differs per layer)."""
    d, kvh, heads, hidden = spec["head_dim"], spec["num_kv_heads"], spec["num_heads"], spec["hidden_size"]
    rope = s.qk_rope_head_dim if s.qk_rope_head_dim is not None else max(2, d // 2 - (d // 2) % 2)
    nope = s.qk_nope_head_dim if s.qk_nope_head_dim is not None else d - rope
    v = s.v_head_dim if s.v_head_dim is not None else d
    rank = s.kv_lora_rank if s.kv_lora_rank is not None else _round_to(kvh * d / 2, 16)
    if rope < 2 or rope % 2:
        raise AttnEditError(f"qk_rope_head_dim={rope}: must be an even number >= 2")
    if nope < 0 and s.qk_nope_head_dim is None:  # the default, head_dim - rope: name what the user set
        raise AttnEditError(
            f"qk_rope_head_dim={rope} is more than the teacher's head_dim {d}; use qk_rope_head_dim <= {d - d % 2} (or set qk_nope_head_dim too)"
        )
    if nope < 0:
        raise AttnEditError(f"qk_nope_head_dim={nope}: must be >= 0")
    if v < 1:
        raise AttnEditError(f"v_head_dim={v}: must be >= 1")
    limit = min(hidden, heads * (nope + v))
    if not 1 <= rank <= limit:
        raise AttnEditError(f"kv_lora_rank={rank}: must be between 1 and {limit} (hidden size / per-head K+V width)")
    if s.q_lora_rank is not None and not 1 <= s.q_lora_rank <= hidden:
        raise AttnEditError(f"q_lora_rank={s.q_lora_rank}: must be between 1 and the hidden size {hidden}, or none")
    if s.absorb not in ("auto", "always", "never"):
        raise AttnEditError(f"absorb={s.absorb!r}: choose auto, always or never")
    if s.rank_allocation not in ("uniform", "auto"):
        raise AttnEditError(f"rank_allocation={s.rank_allocation!r}: choose uniform or auto")
    if s.init_weighting not in ("tokens", "attention"):
        raise AttnEditError(f"init_weighting={s.init_weighting!r}: choose tokens or attention")
    if s.init_weighting == "attention" and s.init != "teacher":
        raise AttnEditError("init_weighting=attention weighs the teacher's calibration: it needs init=teacher")
    if s.rank_allocation == "auto" and s.init != "teacher":
        raise AttnEditError("rank_allocation=auto measures the teacher's factorisation: it needs init=teacher")
    bias = str(s.bias).lower()
    if bias not in ("auto", "true", "false"):
        raise AttnEditError(f"bias={s.bias!r}: choose auto (follow the teacher), true or false")
    if s.init == "teacher" and (nope + rope != d or v != d):
        raise AttnEditError(
            f"init=teacher for MLA needs qk_nope_head_dim + qk_rope_head_dim = head_dim ({d}) and "
            f"v_head_dim = {d}; got {nope}+{rope} and {v}; use these dims or init=random"
        )
    theta = s.rope_theta if s.rope_theta is not None else teacher_theta(config, layer_rope) ** (rope / d)
    if not math.isfinite(theta) or theta <= 1.0:
        raise AttnEditError(f"rope_theta={theta}: must be a finite number > 1")
    if rank + rope > 2 * kvh * d:
        raise AttnEditError(
            f"kv_lora_rank + qk_rope_head_dim = {rank} + {rope} values per token is more than the teacher caches "
            f"(2 x {kvh} KV heads x head_dim {d} = {2 * kvh * d}): the KV cache would grow; lower kv_lora_rank"
        )
    return {
        "kind": "mla",
        "kv_lora_rank": rank,
        "q_lora_rank": s.q_lora_rank,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": v,
        "absorb": s.absorb,
        "rope_theta": theta,
        "bias": bool(spec.get("qkv_bias") or spec.get("o_bias")) if bias == "auto" else bias == "true",
    }


def gateswa_window(s: GateSWASettings, config) -> int:
    """The sliding window: the setting, else 1024 tokens, at most a quarter of the max context."""
    max_pos = getattr(config, "max_position_embeddings", None) or 4096
    return s.window if s.window is not None else min(1024, max(1, max_pos // 4))


def plan_gateswa(s: GateSWASettings, spec: dict, config, layer_idx: int, full: set[int], heads: dict | None = None, teacher_window: int | None = None) -> dict:
    """One GateSWA layer: full when ``layer_idx`` is in ``full``, else sliding, with the KV heads ``heads[layer_idx]``
    kept full (``targets/split_heads.py``). Where the teacher slides already (``teacher_window``) the layer keeps the
    teacher's own window, never widened, without sinks (it had none)."""
    window = gateswa_window(s, config)
    if window < 1:
        raise AttnEditError(f"window={window}: must be >= 1 token")
    if s.sink < 0:
        raise AttnEditError(f"sink={s.sink}: must be >= 0")
    context = getattr(config, "max_position_embeddings", None)
    if context and window + s.sink >= context:  # a sliding layer would see every token: no cache saved
        raise AttnEditError(
            f"window={window} (+ sink {s.sink}) covers the teacher's whole context ({context} tokens), so sliding layers "
            f"would attend to every token and the cache would not shrink; use a window below {context - s.sink}"
        )
    if s.gate not in ("elementwise", "headwise", "none"):
        raise AttnEditError(f"gate={s.gate!r}: choose elementwise, headwise or none")
    if not 0.0 < s.gate_init < 1.0:
        raise AttnEditError(f"gate_init={s.gate_init}: must be strictly between 0 and 1")
    if s.auto_score not in ("kl", "recall"):
        raise AttnEditError(f"auto_score={s.auto_score!r}: choose kl or recall")
    if s.auto_seq_len is not None and s.auto_seq_len < 2:
        raise AttnEditError(f"auto_seq_len={s.auto_seq_len}: needs at least 2 tokens; use e.g. 8192")
    layer = {
        "kind": "gateswa",
        "layer_type": "full" if layer_idx in full else "sliding",
        "window": window,
        "sink": s.sink,
        "gate": s.gate,
        "gate_bias": math.log(s.gate_init / (1.0 - s.gate_init)),
    }
    if teacher_window is not None and (layer["layer_type"] == "full" or teacher_window <= window):
        layer.update(layer_type="sliding", window=teacher_window, sink=0)
    elif heads and heads.get(layer_idx) and layer_idx not in full:  # some KV heads full
        layer["full_kv_heads"] = list(heads[layer_idx])
    return layer


def parse_auto(full_layers: str) -> int | None:
    """``'auto:K'`` -> K; anything else -> None."""
    text = str(full_layers).strip().lower()
    if not text.startswith("auto:"):
        return None
    try:
        k = int(text.split(":", 1)[1])
    except ValueError:
        k = -1
    if k < 0:
        raise AttnEditError(f"full_layers='{full_layers}': 'auto:K' needs an integer K >= 0")
    return k


def plan_layers(target: str, settings: TargetSettings, config, family) -> tuple[list[dict], list[int]]:
    """Per-layer attention descriptions for an edited model, and the indices of the edited layers: the
    target's :meth:`~attnedit.surgery.api.Target.plan_layer` for edited layers, the teacher's attention
    (with its own window) for the others."""
    if settings.init not in ("random", "teacher"):
        raise AttnEditError(f"init={settings.init!r}: choose random or teacher")
    n = config.num_hidden_layers
    spec = family.attention_spec(config)
    edited = parse_layer_list(settings.layers, n, "layers")
    if not edited:
        raise AttnEditError("layers selects no layer; use 'all' or indices like '0-11'")
    chosen = get_target(target)
    chosen.check(settings, spec, config)
    plan = []
    for i in range(n):
        window = family.window(config, i)
        if i not in edited:
            plan.append({"kind": "dense", "window": window})
        else:
            plan.append(chosen.plan_layer(settings, LayerPlan(i, n, spec, config, window, family.rope(config, i))))
    return plan, edited
