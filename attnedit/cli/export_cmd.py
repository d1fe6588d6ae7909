"""``attnedit export``: write a converted model in a format serving engines load natively."""

from __future__ import annotations

import argparse

from ..schema import add_flags, from_args
from .common import add_json, add_model, add_out, add_overwrite


def add_parser(sub) -> None:
    from ..export import ExportSettings, all_formats

    p = sub.add_parser(
        "export",
        help="write a converted model in a serving format (deepseek_v3 for MLA, ministral/qwen2/qwen3 for GateSWA, the teacher's for GQA)",
        description="Write a converted model in a format other tools load. Stock formats load with "
        "AutoModelForCausalLM without trust_remote_code and serve in vLLM/SGLang (docs/serving.md). "
        "The parity check (--check, on by default) reloads the export in float32 on the CPU and requires "
        "logits within 1e-4 of the attnedit model's, an identical 32-token greedy generation, and a stock "
        "cache holding exactly the designed bytes (latent for MLA, window tokens for sliding layers). The folder's model "
        "card (README.md) comes along, with a line saying what the export is.",
        epilog="formats:\n" + "\n".join(f"  {k:<12} {v}" for k, v in all_formats().items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(p, "converted checkpoint folder (a run's model/ folder)")
    add_flags(p, ExportSettings)
    add_out(p, "output folder")
    add_overwrite(p)
    add_json(p, "print the parity report as JSON")
    p.set_defaults(func=run)


def resolve_format(model, fmt: str) -> str:
    """``stock`` -> the stock format of the model's target (its :meth:`Target.stock_format`), or ``hf``."""
    from ..export.stock import model_target
    from ..surgery.api import TARGETS, get_target

    if fmt != "stock":
        return fmt
    target = model_target(model)
    return (get_target(target).stock_format(model) if target in TARGETS else None) or "hf"


def export(model, tokenizer, fmt: str, out, overwrite: bool = False):
    """Write ``model`` in ``fmt``; returns the folder and whether loading it needs remote code. The model card
    comes along (``export.card``)."""
    from ..export import save_edited, write_export
    from ..export.card import carry_card

    if fmt == "hf":
        folder = save_edited(model, out, tokenizer, overwrite=overwrite)
        carry_card(model, folder, fmt)
        return folder, True
    folder = write_export(model, fmt, out, tokenizer, overwrite=overwrite)
    carry_card(model, folder, fmt)
    return folder, False


def run(args) -> int:
    from ..errors import AttnEditError
    from ..export import ExportSettings
    from ..export.check import check_export
    from ..io import check_output
    from ..teachers import load_model

    settings = from_args(ExportSettings, args)
    check_output(args.out, overwrite=args.overwrite, inputs=(args.model,))  # before the model is loaded
    model, tokenizer = load_model(args.model, dtype="auto")
    if getattr(model.config, "model_type", None) != "attnedit":
        raise AttnEditError(f"{args.model} is not an attnedit model; export takes a converted checkpoint folder")
    fmt = resolve_format(model, settings.format)
    out, remote = export(model, tokenizer, fmt, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (format {fmt}{', remote code' if remote else ', stock: no remote code'})")
    if settings.check:
        report = check_export(model, out, context=settings.check_context, remote_code=remote)
        print(report.to_json() if args.json else report.summary())
        if not report.ok:
            raise AttnEditError(f"the export at {out} does not reproduce the model (see the parity report above); please report this")
    return 0
