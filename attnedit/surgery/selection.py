"""What stays full in a GateSWA model: whole layers or single KV heads, by count or under a KV budget, chosen by
what windowing each costs the teacher on the run's own data.

Syntax, the same for ``full_layers`` (units: layers) and ``full_heads`` (units: KV heads of sliding layers):

* ``auto:K`` - the K units whose windowing costs the teacher most;
* ``auto@F:L`` - as many units as fit a KV cache of F times the teacher's at context L (``auto@0.12:8192``: at
  most 12% of the teacher's KV at 8k), every other edited layer sliding; the count follows from the shapes alone
  (each layer's cache as ``attnedit.eval.kv`` counts it), so ``--dry-run`` shows the KV figure before anything is measured.

What a unit costs (``auto_score``), each unit windowed alone on the teacher (:func:`sensitivity.windowing_costs`),
on 8 blocks of the run's training text (``auto_seq_len`` tokens each):

* ``kl`` - the mean KL(teacher || teacher with the unit windowed) over every position past ``window + sink``;
* ``recall`` - that, plus the mean KL over the long-range targets of the same blocks with a recall span in each
  (``attnedit.data.recall.long_range_blocks``: a piece of the block's own text copied ``window + 1`` or more tokens after itself,
  so that predicting the copy needs the first occurrence, which only full units can see). The teacher predicts
  such a copy by induction; a unit that carries it costs nats per target token there when windowed, one that does
  not costs about what it costs elsewhere. No instruction, question or digits: nothing of the passkey prompts.

``auto:K`` with ``auto_score: kl`` on layers is the measurement earlier versions made, recorded the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import AttnEditError

AUTO_SCORES = ("kl", "recall")


@dataclass(frozen=True)
class Auto:
    """A parsed ``auto`` choice: ``count`` units, or a KV ``budget`` (fraction of the teacher's) at ``context``."""

    count: int | None = None
    budget: float | None = None
    context: int | None = None

    def __str__(self) -> str:
        return f"auto:{self.count}" if self.count is not None else f"auto@{self.budget:g}:{self.context}"


def parse_choice(text, what: str) -> Auto | None:
    """``auto:K`` or ``auto@F:L`` -> :class:`Auto`; anything else (explicit units, 'none', 'every:K') -> None."""
    raw = str(text).strip().lower()
    if not raw.startswith("auto"):
        return None
    hint = f"{what}='{text}': write auto:K (K of them) or auto@F:L (as many as fit F of the teacher's KV at context L, e.g. auto@0.12:8192)"
    if raw.startswith("auto:"):
        try:
            k = int(raw[5:])
        except ValueError:
            raise AttnEditError(hint) from None
        if k < 0:
            raise AttnEditError(f"{what}='{text}': 'auto:K' needs an integer K >= 0")
        return Auto(count=k)
    if not raw.startswith("auto@") or ":" not in raw:
        raise AttnEditError(hint)
    fraction, context = raw[5:].split(":", 1)
    try:
        f, n = float(fraction), int(context)
    except ValueError:
        raise AttnEditError(hint) from None
    if not (0.0 < f <= 1.0) or n < 1:
        raise AttnEditError(f"{what}='{text}': the budget F must be in (0, 1] and the context L at least 1 token")
    return Auto(budget=f, context=n)


def parse_full_heads(text, n_layers: int, kv_heads: int) -> dict[int, list[int]]:
    """``'3.0,7.1'`` (LAYER.HEAD pairs) -> ``{3: [0], 7: [1]}``; ``'none'`` or empty -> ``{}``."""
    raw = ",".join(str(x) for x in text) if isinstance(text, (list, tuple)) else str(text)
    raw = raw.strip().lower().replace(" ", "")
    if raw in ("none", ""):
        return {}
    out: dict[int, set] = {}
    for item in raw.split(","):
        try:
            layer, head = (int(x) for x in item.split("."))
        except ValueError:
            raise AttnEditError(f"full_heads: cannot read {item!r}; use LAYER.HEAD pairs like '3.0,7.1', 'none' or auto:N / auto@F:L") from None
        if not 0 <= layer < n_layers or not 0 <= head < kv_heads:
            raise AttnEditError(f"full_heads: {item} does not exist; the model has layers 0-{n_layers - 1} with KV heads 0-{kv_heads - 1}")
        out.setdefault(layer, set()).add(head)
    return {k: sorted(v) for k, v in sorted(out.items())}


def format_full_heads(units: list) -> str:
    """``[(3, 0), (7, 1)]`` -> ``'3.0,7.1'`` (``'none'`` when empty)."""
    return ",".join(f"{layer}.{head}" for layer, head in sorted(units)) or "none"


def spread(candidates: list, k: int) -> list:
    """``k`` of ``candidates`` spread evenly: what a plan made from configs alone shows for an unmeasured choice."""
    return sorted({candidates[round((j + 1) * len(candidates) / k) - 1] for j in range(k)}) if k else []


def budget_count(auto: Auto, what: str, teacher_values: float, fixed_values: float, unit_values: float, n_units: int) -> int:
    """How many units fit ``auto``'s budget: the teacher caches ``teacher_values`` per token at its context, the
    model without any unit full ``fixed_values``, and each unit made full adds ``unit_values``."""
    allowed = auto.budget * teacher_values
    if allowed < fixed_values * (1 - 1e-9):
        raise AttnEditError(
            f"{what}={auto}: with nothing full the model already caches {fixed_values / teacher_values:.1%} of the "
            f"teacher's KV at {auto.context} tokens; raise the budget, or lower window/sink"
        )
    if unit_values <= 0:
        return n_units
    return min(n_units, math.floor((allowed - fixed_values) / unit_values + 1e-9))


@dataclass
class Layout:
    """What the settings fix and what an ``auto`` choice picks among (units and how many)."""

    full: set  # full layers fixed by the settings
    heads: dict  # fixed full KV heads per layer
    unit: str | None  # 'layers' or 'heads' when a choice is to be made, else None
    candidates: list  # layers, or (layer, head) pairs
    count: int
    auto: Auto | None
    window: int
    sink: int
    kv_heads: int


def layout(settings, config, family, edited: list[int]) -> Layout:
    """Resolve ``full_layers``/``full_heads`` into the fixed full units and, for an ``auto`` one, its candidates and
    count. Layers where the teacher slides already keep its window (:func:`settings.plan_gateswa`): none of their KV
    heads can be full, and an ``auto`` choice does not count them among its candidates."""
    from .api import dense_values, get_target
    from .settings import gateswa_window, parse_layer_list, plan_gateswa

    n = config.num_hidden_layers
    spec = family.attention_spec(config)
    kvh, d = spec["num_kv_heads"], spec["head_dim"]
    window, sink = gateswa_window(settings, config), settings.sink
    teacher_windows = [family.window(config, i) for i in range(n)]
    layers_auto = parse_choice(settings.full_layers, "full_layers")
    heads_auto = parse_choice(settings.full_heads, "full_heads")
    if layers_auto is not None and heads_auto is not None:
        raise AttnEditError("full_layers and full_heads are both auto: choose one of them (the other explicit, e.g. none)")
    full = set() if layers_auto is not None else set(parse_layer_list(settings.full_layers, n, "full_layers"))
    heads = {} if heads_auto is not None else parse_full_heads(settings.full_heads, n, kvh)
    if layers_auto is not None and heads:
        raise AttnEditError("full_layers=auto... chooses whole layers: set full_heads=none, or choose heads with full_heads=auto...")
    for layer, kept in heads.items():
        if layer in full:
            raise AttnEditError(f"full_heads names layer {layer}, which full_layers already keeps full: drop it from one of them")
        if layer not in edited:
            raise AttnEditError(f"full_heads names layer {layer}, which is not edited (layers={settings.layers})")
        if len(kept) == kvh:
            raise AttnEditError(f"full_heads keeps every KV head of layer {layer} full: list the layer in full_layers instead")
        if teacher_windows[layer] is not None:
            raise AttnEditError(
                f"full_heads names layer {layer}, where the teacher itself slides ({teacher_windows[layer]} tokens): its KV "
                "heads saw no further, so none can be full; drop the layer from full_heads"
            )
    auto = layers_auto or heads_auto
    if auto is None:
        return Layout(full, heads, None, [], 0, None, window, sink, kvh)
    sliding = [i for i in edited if i not in full and teacher_windows[i] is None]
    if layers_auto is not None:
        unit, candidates = "layers", sliding
        if auto.count is not None and auto.count > n:
            raise AttnEditError(f"full_layers=auto:{auto.count}: the model has only {n} layers")
    else:
        unit, candidates = "heads", [(i, h) for i in sliding for h in range(kvh)]
    if auto.count is not None:
        count = min(auto.count, len(candidates))
    else:
        context, target = auto.context, get_target("gateswa")  # values per token each layer caches, as attnedit.eval.kv counts them
        teacher = [dense_values(kvh, d, teacher_windows[i], 0, context) for i in range(n)]
        fixed = sum(
            target.cache_values(plan_gateswa(settings, spec, config, i, full, heads, teacher_windows[i]), spec, context) if i in edited else teacher[i]
            for i in range(n)
        )
        per_unit = (kvh if unit == "layers" else 1) * (2.0 * d - dense_values(1, d, window, sink, context))
        count = budget_count(auto, "full_layers" if unit == "layers" else "full_heads", sum(teacher), fixed, per_unit, len(candidates))
    return Layout(full, heads, unit, candidates, count, auto, window, sink, kvh)


def gateswa_layout(settings, config, family, edited: list[int]) -> tuple[set, dict]:
    """The full layers and the full KV heads per layer of a GateSWA plan. An ``auto`` choice has not been measured
    when a plan is made from configs alone (``--dry-run``, ``inspect``): as many units spread evenly stand in
    for it, which gives the same KV figures; ``convert`` measures the real choice before it edits (:func:`resolve_auto`)."""
    lay = layout(settings, config, family, edited)
    if lay.unit is None:
        return lay.full, lay.heads
    if lay.unit == "layers":
        if lay.auto.count is not None:  # as earlier versions placed auto:K: spread over every layer
            k, n = lay.auto.count, config.num_hidden_layers
            return {round((j + 1) * n / k) - 1 for j in range(k)} if k else set(), lay.heads
        return set(spread(lay.candidates, lay.count)), lay.heads
    return split_units(lay, spread(lay.candidates, lay.count))


def split_units(lay: Layout, chosen: list) -> tuple[set, dict]:
    """Chosen (layer, KV head) pairs as full layers (where every KV head of a layer was chosen) and full heads."""
    heads: dict = {}
    for layer, head in chosen:
        heads.setdefault(layer, []).append(head)
    whole = {layer for layer, kept in heads.items() if len(kept) == lay.kv_heads}
    return lay.full | whole, {layer: sorted(kept) for layer, kept in heads.items() if layer not in whole}


def choose(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in index order (ties: the earlier)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def resolve_auto(teacher, target_args: dict, calibration, measured: dict | None = None, long_range=None) -> tuple[dict, dict | None]:
    """``target_args`` with an ``auto`` ``full_layers``/``full_heads`` replaced by the units chosen, and the record
    of the choice; unchanged args and None without ``auto``. ``measured``, a record from an earlier start of the
    run, is applied as it is; otherwise ``calibration()`` (token ids [n, T] of the run's data, called only then)
    is measured, and for ``auto_score: recall`` ``long_range(ids, window, sink)`` gives those blocks with their
    long-range targets (``attnedit.data.recall.long_range_blocks``). ``auto:K`` on layers with ``auto_score: kl``
    is :func:`sensitivity.resolve_auto_full_layers`."""
    from ..families import family_for
    from .sensitivity import resolve_auto_full_layers
    from .settings import parse_layer_list, parse_settings

    settings = parse_settings("gateswa", target_args)
    edited = parse_layer_list(settings.layers, teacher.config.num_hidden_layers, "layers")
    lay = layout(settings, teacher.config, family_for(teacher.config), edited)
    if lay.unit is None:
        return target_args, None
    if lay.unit == "layers" and lay.auto.count is not None and settings.auto_score == "kl":
        return resolve_auto_full_layers(teacher, target_args, calibration, measured)
    if measured is None:
        measured = measure(teacher, lay, settings.auto_score, calibration, long_range)
    chosen = measured["chosen"]
    if lay.unit == "layers":
        return {**target_args, "full_layers": ",".join(map(str, chosen)) or "none"}, measured
    full, heads = split_units(lay, [tuple(u) for u in chosen])
    value = format_full_heads([(layer, h) for layer, kept in heads.items() for h in kept])
    return {**target_args, "full_layers": ",".join(map(str, sorted(full))) or "none", "full_heads": value}, measured


def measure(teacher, lay: Layout, score: str, calibration, long_range=None) -> dict:
    """Measure ``lay``'s candidates on ``calibration()`` (with ``long_range``'s targets for ``recall``) and choose;
    the record ``full_layers.json`` keeps."""
    from .sensitivity import windowing_costs

    record = {
        "auto": str(lay.auto), "unit": lay.unit, "score": score, "count": lay.count, "window": lay.window,
        "sink": lay.sink, "candidates": [list(u) if isinstance(u, tuple) else u for u in lay.candidates],
    }  # fmt: skip
    if lay.auto.budget is not None:
        record["budget"] = {"fraction": lay.auto.budget, "context": lay.auto.context}
    if lay.count in (0, len(lay.candidates)):  # nothing to choose: no measurement
        record["chosen"] = record["candidates"][: lay.count]
        return record
    ids = calibration()
    targets = None
    if score == "recall":
        if long_range is None:
            raise AttnEditError("auto_score=recall is measured on the run's data: run attnedit convert with it")
        ids, targets = long_range(ids, lay.window, lay.sink)
    units = [(u, None) if lay.unit == "layers" else u for u in lay.candidates]
    costs = windowing_costs(teacher, ids, lay.window, lay.sink, units, targets)
    scores = costs["kl"] if targets is None else [a + b for a, b in zip(costs["kl"], costs["recall"])]
    record["chosen"] = [record["candidates"][i] for i in choose(scores, lay.count)]
    record["scores_kl"] = [round(x, 8) for x in costs["kl"]]
    if targets is not None:
        record["scores_recall"] = [round(x, 8) for x in costs["recall"]]
        record["recall_targets"] = int(targets.sum())
    record["calibration"] = list(ids.shape)
    return record
