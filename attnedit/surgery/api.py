"""The target API: what an attention design supplies so that attnedit can convert a model to it.

A target is one :class:`Target` (registered with :func:`register_target`) plus its attention class, a
``torch.nn.Module`` built by the edited model's remote code (``attnedit/targets``, or a file of your own that
is copied into every checkpoint). The attention class is the part that runs after conversion:

* ``kind`` (class attribute): the name of its layers in ``config.layer_attention``.
* ``__init__(spec, base_config, layer_idx, **layer)``: ``spec`` is the teacher's attention
  (``teacher_attention``: heads, head_dim, biases, QK-norm, score scale...), ``base_config`` the teacher's
  config as a dict (for RoPE: ``targets.common.Rotary(dim, base_config)``), ``layer`` the dict the target's
  :meth:`Target.plan_layer` returned for this layer (without ``kind``).
* ``forward(x, ctx) -> Tensor``: ``x`` [batch, tokens, hidden] is the attention's input, ``ctx`` an
  ``AttentionContext`` (positions, padding, the cache); returns [batch, tokens, hidden].
* ``new_cache(static=False, batch=1, max_length=0, dtype=None, device=None)``: this layer's slot of the
  model's cache, a ``targets.common.CacheLayer`` whose ``tensors()`` are what it holds (growing, or static:
  allocated once and written in place). ``ctx.cache.layers[layer_idx]`` is it during a forward.

The :class:`Target` is the part attnedit uses to make such a model: the settings users give (a dataclass
deriving from ``TargetSettings``), the per-layer plan, the cache's analytic size (what ``inspect``, the
``--dry-run`` plan, ``bench`` and the report print, and what a test compares with the bytes the cache really
holds), how new weights start (random, or from the teacher's attention) and, where one exists, the stock
format ``attnedit export`` writes. Stage 1, stage 2, the bench, passkey, report and inspect need nothing else.
``docs/targets.md`` walks through a complete one.

Targets outside this package register with :func:`register_target` (in Python), or, for the command line,
through the ``attnedit.targets`` entry-point group of an installed package (each entry point names a module,
imported before any target is looked up, that calls :func:`register_target`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import AttnEditError
from ..families.hooks import capture_attention_inputs


@dataclass(frozen=True)
class LayerPlan:
    """What a target knows when it plans one layer of the teacher."""

    index: int  # the layer
    n_layers: int
    spec: dict  # the teacher's attention (``teacher_attention``: heads, head_dim, biases, QK-norm, scale, softcap)
    config: object  # the teacher's transformers config
    window: int | None  # the teacher's own sliding window in this layer (None: full attention)
    rope: dict  # this layer's RoPE parameters (``rope_theta``, ``rope_type`` and its scaling)


class Target:
    """One attention design. Subclass it, set the class attributes, implement :meth:`plan_layer` and
    :meth:`cache_values` (and :meth:`init_from_teacher` if ``init=teacher`` should work), then
    :func:`register_target` an instance."""

    name: str = ""  # the recipe's ``target:``, ``attnedit edit --target``
    settings: type = None  # a dataclass deriving from ``attnedit.surgery.TargetSettings`` (layers, init, seed)
    attention: type = None  # the attention class (see the module doc); its ``kind`` names the planned layers
    code: tuple = ()  # files copied into every checkpoint beside attnedit's own (an attention outside attnedit/targets)
    calibrated: bool = False  # init=teacher reads the teacher on calibration text first (calibrate)
    help: str = ""  # one line for ``attnedit edit --help``

    @property
    def kinds(self) -> tuple[str, ...]:
        """The layer kinds this target plans (its attention class's ``kind``)."""
        return (self.attention.kind,)

    def check(self, settings, spec: dict, config) -> None:
        """Reject settings that cannot work for this teacher, as a one-line ``AttnEditError``."""

    def plan_layer(self, settings, layer: LayerPlan) -> dict:
        """The description of one edited layer: ``{"kind": <attention kind>, **constructor arguments}``,
        JSON-serialisable; it is stored in the checkpoint's config and passed to the attention's constructor."""
        raise NotImplementedError

    def unmeasured(self, settings) -> str | None:
        """Why a model cannot be built from ``settings`` without the run's own data (a setting ``convert`` measures on
        it first, such as GateSWA's ``full_layers: auto:K``), as a one-line message ``edit`` raises; None when it can."""
        return None

    def choose(self, teacher, target_args: dict, blocks, measured: dict | None = None, long_range=None) -> tuple[dict, dict | None]:
        """What ``convert`` measures on the run's own text before it edits (GateSWA's ``full_layers``/``full_heads:
        auto...``): ``target_args`` with the choice written in, and a JSON record of it, which ``convert`` keeps in the
        run folder (``full_layers.json``) and passes back as ``measured`` on resume and export (nothing is measured
        then). ``blocks(seq_len=None)`` gives token ids [n, seq_len] of the run's training text (None: its longest
        stage's length; ``blocks`` is None where there is no data to measure on); ``long_range(ids, window, sink)``,
        those blocks with a span copied further back than ``window`` and their long-range targets
        (``attnedit.data.recall.long_range_blocks``). By default nothing is measured: ``(target_args, None)``."""
        return target_args, None

    def cache_values(self, layer: dict, spec: dict, context: int) -> float:
        """Cached values per token of one layer at ``context`` tokens, from its description alone (the KV
        figures everywhere; a test checks the cache allocates exactly this many)."""
        raise NotImplementedError

    def cache_label(self, layer: dict) -> str:
        """The layer's kind as ``inspect`` shows it (e.g. ``gateswa-sliding``)."""
        return layer["kind"]

    def parameters(self, layer: dict, spec: dict) -> int:
        """Parameters of one layer's attention; by default counted on the meta device."""
        args = {k: v for k, v in layer.items() if k != "kind"}
        with torch.device("meta"):
            module = self.attention_class(layer)(spec, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, 0, **args)
        return sum(p.numel() for p in module.parameters())

    def attention_class(self, layer: dict) -> type:
        return self.attention

    @torch.no_grad()
    def init_random(self, attn: nn.Module, layer: dict, std: float) -> None:
        """Random weights (the paper's start): normal(0, std) matrices, zero biases, unit norms."""
        from .init import random_init

        random_init(attn, std)

    def calibrate(self, teacher, layers: list[int], ids: torch.Tensor, config, settings) -> dict:
        """With ``calibrated`` and ``init=teacher``, before the student is built: read the teacher on calibration
        token ids ``ids`` (the run's own text in ``convert``, random tokens in ``edit``) and return, per edited
        layer, what :meth:`init_from_teacher` receives as ``inputs``; may adjust ``config.layer_attention`` (MLA
        shares its latent width between layers here). By default each layer's attention inputs, [tokens, hidden]
        in float64."""
        return {i: x.to(torch.float64) for i, x in capture_attention_inputs(teacher, layers, ids).items()}

    def init_from_teacher(self, attn: nn.Module, teacher: nn.Module, layer: dict, spec: dict, inputs, settings) -> None:
        """Start ``attn`` from the teacher's attention ``teacher`` (separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``
        and ``q_norm``/``k_norm`` where it has them, whatever the family fuses); ``inputs``: what :meth:`calibrate`
        returned for this layer (None unless ``calibrated``); ``settings``: the target's settings."""
        raise AttnEditError(f"target {self.name} has no initialisation from the teacher; use init=random")

    # export: the stock formats this target's models can be written in (name -> one line), where one exists
    exports: ClassVar[Mapping[str, str]] = {}

    def stock_format(self, model) -> str | None:
        """The format ``attnedit export --format stock`` writes for ``model``, or None (only ``hf``)."""
        return None

    def export(self, model, fmt: str, out, tokenizer=None, overwrite: bool = False) -> Path:
        """Write ``model`` in stock format ``fmt`` (one of :attr:`exports`); returns the folder. (The built-in
        targets' formats are written by ``attnedit/export``, which this layer does not import.)"""
        raise AttnEditError(f"target {self.name} has no stock format; export --format hf")


def dense_values(kv_heads: int, head_dim: int, window: int | None, sink: int, context: int) -> float:
    """Cached values per token of a K/V cache at ``context`` tokens: every token, or a window (+ sinks)'s worth
    (the teacher's attention, GateSWA's and GQA's layers; ``eval/kv.py`` reads every layer's through here)."""
    full = 2 * kv_heads * head_dim
    return float(full) if window is None else full * min(window + sink, context) / context


def dense_parameters(spec: dict, kv_heads: int | None = None) -> int:
    """Parameters of a teacher-shaped attention (q/k/v/o, biases, QK-norm) with ``kv_heads`` KV heads."""
    h, heads, d = spec["hidden_size"], spec["num_heads"], spec["head_dim"]
    kvh = spec["num_kv_heads"] if kv_heads is None else kv_heads
    n = h * heads * d + 2 * h * kvh * d + heads * d * h
    if spec["qkv_bias"]:
        n += heads * d + 2 * kvh * d
    if spec["o_bias"]:
        n += h
    if spec["qk_norm"] == "projection":
        n += heads * d + kvh * d
    elif spec["qk_norm"]:
        n += 2 * d
    return n


_REGISTRY: dict[str, Target] = {}
_BUILTIN: list[Target] = []  # attnedit's own targets (add_builtin), registered first at the registry's first use
_LOADED = False


def add_builtin(*targets: Target) -> None:
    """Name attnedit's own targets (``attnedit.surgery`` adds ``builtin.BUILTIN`` when it is imported): the
    registry registers them first, before the entry points' targets, when a target is first looked up."""
    _BUILTIN.extend(t for t in targets if t not in _BUILTIN)


def register_target(target: Target, replace: bool = False) -> Target:
    """Make ``target`` known to recipes, the CLI and every stage; its attention class to the edited model."""
    from ..targets import ATTENTION_CLASSES

    _load()
    if not target.name or target.settings is None or target.attention is None:
        raise AttnEditError("a target needs a name, a settings dataclass and an attention class")
    if target.name in _REGISTRY and not replace and _REGISTRY[target.name] is not target:
        raise AttnEditError(f"a target named {target.name!r} is registered already")
    for kind in target.kinds:
        other = target_of_kind(kind, missing_ok=True)
        if kind == "dense" or (other is not None and other.name != target.name and not replace):
            raise AttnEditError(f"layer kind {kind!r} belongs to {'the unedited layers' if kind == 'dense' else other.name}")
        ATTENTION_CLASSES[kind] = target.attention
    _REGISTRY[target.name] = target
    return target


def unregister_target(name: str) -> None:
    """Forget an outside target (tests)."""
    from ..targets import ATTENTION_CLASSES

    target = _REGISTRY.pop(name, None)
    if target is not None:
        for kind in target.kinds:
            ATTENTION_CLASSES.pop(kind, None)


def _load() -> None:
    """Register the built-in targets, then those of installed packages (entry-point group ``attnedit.targets``)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from importlib import metadata

    for target in _BUILTIN:
        register_target(target)
    for ep in metadata.entry_points(group="attnedit.targets"):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise AttnEditError(f"the attnedit.targets entry point {ep.name!r} ({ep.value}) failed to load: {e}") from None


def get_target(name: str) -> Target:
    _load()
    if name not in _REGISTRY:
        raise AttnEditError(f"unknown target {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def target_of_kind(kind: str, missing_ok: bool = False) -> Target | None:
    """The target whose layers have this kind (``dense``: None, the teacher's own attention)."""
    _load()
    for target in _REGISTRY.values():
        if kind in target.kinds:
            return target
    if missing_ok or kind == "dense":
        return None
    raise AttnEditError(f"no target has layers of kind {kind!r}; is the target that made this model registered?")


def code_files(config) -> list[Path]:
    """The outside targets' files a checkpoint of ``config`` needs beside attnedit's own remote code."""
    kinds = {layer["kind"] for layer in getattr(config, "layer_attention", [])}
    files = []
    for target in {t.name: t for k in kinds if (t := target_of_kind(k, missing_ok=True)) is not None}.values():
        files += [Path(f) for f in target.code]
    return files


def attention_code(target: Target) -> dict[str, str]:
    """``config.attention_code`` for a target whose attention lives outside attnedit/targets: kind -> "file.Class"."""
    if not target.code:
        return {}
    module_file = Path(target.code[0]).stem
    return {kind: f"{module_file}.{target.attention.__name__}" for kind in target.kinds}


class _Names(Sequence):
    """The registered target names, read when used (so that registering later is seen everywhere)."""

    def _names(self) -> list[str]:
        _load()
        return list(_REGISTRY)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


class _Settings(Mapping):
    """Target name -> its settings dataclass, read when used."""

    def __getitem__(self, name):
        return get_target(name).settings

    def __contains__(self, name) -> bool:
        return name in TARGETS

    def __iter__(self):
        return iter(TARGETS)

    def __len__(self) -> int:
        return len(TARGETS)


TARGETS: Sequence[str] = _Names()
SETTINGS: Mapping[str, type] = _Settings()

__all__ = [
    "SETTINGS",
    "TARGETS",
    "LayerPlan",
    "Target",
    "attention_code",
    "code_files",
    "dense_parameters",
    "dense_values",
    "get_target",
    "register_target",
    "target_of_kind",
    "unregister_target",
]
