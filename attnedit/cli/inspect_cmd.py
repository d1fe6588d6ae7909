"""``attnedit inspect``: per-layer attention kind, parameters and KV bytes of any model."""

from __future__ import annotations

import json

from ..schema import add_flags, from_args
from .common import add_json, add_model


def add_parser(sub) -> None:
    from ..eval.inspect import InspectSettings

    p = sub.add_parser(
        "inspect",
        help="show each layer's attention, parameters and KV-cache bytes (teacher or edited model)",
        description="Per-layer attention kind, attention parameters and KV-cache bytes per token at a "
        "given context, with totals. Reads the config only; no weights are loaded.",
    )
    add_model(p, "edited checkpoint folder, Hugging Face id, local folder, .gguf or smollm2-135m")
    add_flags(p, InspectSettings)
    add_json(p, "print JSON: layers (per layer), kv_bytes_per_token, kv_bytes_total, attention_params, params, "
             "and for an edited model the teacher's KV and the ratio")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.inspect import InspectSettings, format_inspection, inspect_config
    from ..teachers import load_config

    settings = from_args(InspectSettings, args)
    info = inspect_config(load_config(args.model), settings.context, settings.dtype)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0
