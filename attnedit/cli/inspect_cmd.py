"""``attnedit inspect``: per-layer attention kind, parameters and KV bytes of any model."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show each layer's attention, parameters and KV-cache bytes (teacher or edited model)",
        description="Per-layer attention kind, attention parameters and KV-cache bytes per token at a "
        "given context, with totals. Reads the config only; no weights are loaded.",
    )
    p.add_argument("model", help="edited checkpoint folder, Hugging Face id, local folder, .gguf or smollm2-135m")
    p.add_argument("--context", type=int, default=8192, help="sequence length for the KV figures (default 8192)")
    p.add_argument("--dtype", default=None, help="cache dtype (default: the model's, else bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON: layers (per layer), kv_bytes_per_token, kv_bytes_total, attention_params, params, and for an edited model the teacher's KV and the ratio")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import AttnEditError
    from ..eval.inspect import format_inspection, inspect_config
    from ..teachers import load_config

    if args.context < 1:
        raise AttnEditError("--context must be at least 1 token")
    info = inspect_config(load_config(args.model), args.context, args.dtype)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0
