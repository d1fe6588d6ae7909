"""One schema for recipes, ``--set`` and the subcommands' flags.

Settings are dataclasses whose fields carry a one-line help (and, where the values are a fixed set, the
allowed values) in their metadata: ``setting(default, help, choices)``. One such field is, at once:

- a recipe key: ``eval.ppl_context: [2048, 8192]`` in YAML, filled and typed by :func:`build`;
- a ``--set`` override: ``--set eval.ppl_context=2048,8192``, typed by the same :func:`coerce_value`;
- a subcommand's flag: ``attnedit eval --ppl-context 2048,8192``, made by :func:`add_flags` (name with
  dashes, type, default, help, choices) and read back by :func:`from_args`; a tuple in a list is written
  with ``x`` (``--stock-cells 1x8192,64x8192``);
- a line of ``attnedit recipe --explain``.

Types are checked by pydantic's ``TypeAdapter`` (:func:`coerce`): ``"12"`` -> 12,
``"1e-3"`` -> 0.001, ``"true"`` -> True, ``none``/``null`` -> None where allowed. A list field takes a YAML
list, a comma-separated string, or one value. Range rules live in each dataclass's ``__post_init__``
(:func:`require`); a broken rule is a :class:`FieldError`, which :func:`build` and :func:`from_args` name by
the recipe key (``eval.bench.repeats=0: must be >= 1``) or the flag (``--repeats 0: must be >= 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field

import yaml
from pydantic import TypeAdapter, ValidationError

from .errors import AttnEditError

REQUIRED = dataclasses.MISSING


def _adapter(hint) -> TypeAdapter:
    if hint not in _ADAPTERS:
        _ADAPTERS[hint] = TypeAdapter(hint)
    return _ADAPTERS[hint]


_ADAPTERS: dict = {}


def type_name(hint) -> str:
    """A type as a user reads it: ``int``, ``int or 'auto'``, ``list of int``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {type_name(args[0]) if args else 'str'}"
    if origin is tuple:
        return " x ".join(type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def coerce(name: str, value, hint):
    """Turn a string from ``--set`` (or a YAML scalar) into the field's type, or explain why not in one line.

    ``hint`` is a resolved type (``typing.get_type_hints``); pydantic does the conversion (lax mode:
    ``"12"`` -> 12, ``"1e-3"`` -> 0.001, ``"true"`` -> True; ``1.5`` is not an int). ``none``/``null``
    or an empty string give None where the field allows it.
    """
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    optional = union and type(None) in typing.get_args(hint)
    rest = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    base = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 - a Union built from a list at run time
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise AttnEditError(f"{name} needs a value of type {type_name(base)}")
    if base is str:  # YAML may read `layers: 0-3,7` or `layers: [0, 3]`; a str field keeps the text
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    try:
        return _adapter(base).validate_python(value)
    except ValidationError:
        raise AttnEditError(f"{name}={value!r} is not a valid {type_name(base)}") from None


def setting(default, help: str, choices: tuple | None = None, metavar: str | None = None):
    """A dataclass field with its help text (and allowed values) in the metadata; a list or dict default is
    copied for every instance. ``REQUIRED`` as the default makes a field (and its flag) required; ``metavar``
    names the flag's value in ``--help`` (default: from the type, e.g. ``N[,N...]``)."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, help: str):
    """A nested settings dataclass (a recipe section such as ``stage1:`` or ``eval.bench:``)."""
    return field(default_factory=cls, metadata={"help": help, "choices": None})


class FieldError(AttnEditError):
    """A value that a settings dataclass refuses. ``field`` names the field; :func:`build` and :func:`from_args`
    re-raise it naming the recipe key or the flag."""

    def __init__(self, field: str, value, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field}={value!r}: {rule}")


def require(obj, rules: list[tuple[bool, str, str]]) -> None:
    """Raise a :class:`FieldError` for the first ``(ok, field, rule)`` that does not hold."""
    for ok, name, rule in rules:
        if not ok:
            raise FieldError(name, getattr(obj, name), rule)


# ------------------------------------------------------------------------------------------------ types


def hints(cls) -> dict:
    """The fields' types of a dataclass, resolved (attnedit's annotations are strings)."""
    return typing.get_type_hints(cls)  # each class's annotations in its own module's names


def _strip_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def is_list(hint) -> bool:
    return typing.get_origin(_strip_optional(hint)[0]) is list


def coerce_value(path: str, value, hint, choices=None):
    """``value`` (YAML, a ``--set`` string or a flag's text) as the field's type, or a one-line error."""
    base, optional = _strip_optional(hint)
    origin = typing.get_origin(base)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if origin is list:
        (item,) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            except yaml.YAMLError:
                raise AttnEditError(f"{path}: {value!r} is not a list; write it comma-separated, e.g. 1,2") from None
        elif value is None:
            value = []
        elif not isinstance(value, (list, tuple)):
            value = [value]  # one value for a list: eval.ppl_context: 2048
        if not isinstance(value, (list, tuple)):
            raise AttnEditError(f"{path}: expected a list (YAML list or comma-separated), got {value!r}")
        if item is str:
            out = [str(v).strip() for v in value if str(v).strip()]
        else:
            items = [v.strip() if isinstance(v, str) else v for v in value]
            if typing.get_origin(item) is tuple:  # a tuple in a list is written with x: 1x8192
                items = [v.lower().split("x") if isinstance(v, str) and v else v for v in items]
            out = [coerce(path, v, item) for v in items if v != ""]
    elif origin is dict or base is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise AttnEditError(f"{path}: expected a mapping of settings, got {value!r}")
        return dict(value)
    else:
        if base is str and isinstance(value, (list, tuple, dict)):  # (a target's layer list is a target setting)
            raise AttnEditError(f"{path}: expected one value, got {value!r}; write it without brackets, e.g. {path.split('.')[-1]}: {_one(value)}")
        out = coerce(path, value, hint)
    for v in out if origin is list else [out]:
        if choices and v not in choices:
            raise AttnEditError(f"{path}={v!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
    return out


def _one(value) -> str:
    items = list(value.values() if isinstance(value, dict) else value)
    return str(items[0]) if items else "..."


# ------------------------------------------------------------------------------------ recipes and --set


def build(cls, raw, path: str = ""):
    """Fill dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AttnEditError(f"{path or 'recipe'}: expected a mapping of fields, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise AttnEditError(f"unknown recipe field {name!r}; {path or 'the top level'} has: {', '.join(fields)}")
        if dataclasses.is_dataclass(types[key]):
            values[key] = build(types[key], value, name)
        else:
            values[key] = coerce_value(name, value, types[key], fields[key].metadata.get("choices"))
    try:
        return cls(**values)
    except FieldError as e:
        name = f"{path}.{e.field}" if path else e.field
        raise AttnEditError(f"{name}={e.value!r}: {e.rule}") from None


# -------------------------------------------------------------------------------------------------- flags


def flag(name: str) -> str:
    """The flag of field ``name``: ``ppl_context`` -> ``--ppl-context``."""
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """A default as a user types it: lists comma-separated, None as none, booleans as on/off."""
    if isinstance(value, tuple):
        return "x".join(shown(v) for v in value)
    if isinstance(value, list):
        return ",".join(shown(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _converter(name: str, hint, choices):
    def convert(text: str):
        try:
            return coerce_value(flag(name), text, hint, choices)
        except AttnEditError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag(name)}=").removeprefix(f"{flag(name)}: ")) from None

    convert.__name__ = type_name(hint)  # argparse names the type in its own messages
    return convert


def _metavar(name: str, hint) -> str:
    """``N``, ``X`` (a float), ``N[,N...]`` (a list), ``N|auto``, else the name in capitals."""
    base, _ = _strip_optional(hint)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base) or (str,)
        if typing.get_origin(item) is tuple:
            one = "x".join(_metavar(name, a) for a in typing.get_args(item))
        else:
            one = {int: "N", float: "X"}.get(item, name.upper().rstrip("S"))
        return f"{one}[,{one}...]"
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(base)))
    if origin in (typing.Union, types.UnionType):
        return "|".join(_metavar(name, a) for a in typing.get_args(base))
    return {int: "N", float: "X"}.get(base, name.upper())


def add_flags(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (nested dataclasses and ``skip`` aside): ``--name-with-dashes``, typed
    and checked like a recipe value, with the field's default, help and choices. A boolean is ``--x/--no-x``;
    a list is comma-separated."""
    types = hints(cls)
    for f in dataclasses.fields(cls):
        hint = types[f.name]
        if f.name in skip or dataclasses.is_dataclass(hint):
            continue
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        default = field_default(f)
        required = default is REQUIRED
        default = None if required else default
        if default is not None and "default" not in help_text:
            help_text += f" (default: {shown(default)})"
        kwargs = {"dest": f.name, "default": default, "help": help_text}
        if _strip_optional(hint)[0] is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if choices and not is_list(hint):
            kwargs.update(choices=list(choices), metavar="{" + ",".join(map(str, choices)) + "}")
            choices = None  # argparse checks them
        else:
            kwargs["metavar"] = f.metadata.get("metavar") or _metavar(f.name, hint)
        parser.add_argument(flag(f.name), type=_converter(f.name, hint, choices), required=required, **kwargs)


def from_args(cls, args, **extra):
    """An instance of ``cls`` from the flags :func:`add_flags` made (plus ``extra`` fields); a refused value
    is a one-line error naming its flag."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra and hasattr(args, f.name)]
    try:
        return cls(**{n: getattr(args, n) for n in names}, **extra)
    except FieldError as e:
        raise AttnEditError(f"{flag(e.field)} {shown(e.value)}: {e.rule}") from None


def field_default(f: dataclasses.Field):
    """A field's default (a fresh copy of a list), or ``REQUIRED``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED


def defaults(cls) -> dict:
    """``{field: default}`` of a settings dataclass (what its flags default to), required fields left out."""
    return {f.name: d for f in dataclasses.fields(cls) if (d := field_default(f)) is not REQUIRED}


__all__ = [
    "FieldError",
    "REQUIRED",
    "add_flags",
    "build",
    "coerce_value",
    "defaults",
    "field_default",
    "flag",
    "from_args",
    "hints",
    "require",
    "section",
    "setting",
    "shown",
]
