"""``attnedit export``: write a converted model in a format serving engines load natively."""

from __future__ import annotations

import argparse

FORMATS = {
    "stock": "the model's stock format: deepseek_v3 for MLA, the family's sliding-window format for GateSWA",
    "deepseek_v3": "all-MLA models: stock DeepSeek-V3 (transformers without remote code, vLLM, SGLang)",
    "ministral": "GateSWA with gate=none, sink=0, Llama/Mistral teachers: stock Ministral with layer_types",
    "qwen2": "GateSWA with gate=none, sink=0, Qwen2 (or Llama/Mistral, zero q/k/v biases): stock Qwen2 with layer_types",
    "qwen3": "GateSWA with gate=none, sink=0, Qwen3 teachers: stock Qwen3 with layer_types (transformers only)",
    "qwen3_moe": "GateSWA with gate=none, sink=0, full_layers=none, Qwen3-MoE teachers: stock Qwen3-MoE",
    "hf": "any model: Hugging Face folder with attnedit's remote code (what convert writes)",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a converted model in a serving format (deepseek_v3 for MLA, ministral/qwen2/qwen3 for GateSWA)",
        description="Write a converted model in a format other tools load. Stock formats load with "
        "AutoModelForCausalLM without trust_remote_code and serve in vLLM/SGLang (docs/serving.md). "
        "The parity check (--check, on by default) reloads the export in float32 on the CPU and requires "
        "logits within 1e-4 of the attnedit model's, an identical 32-token greedy generation, and a stock "
        "cache holding exactly the designed bytes (latent for MLA, window tokens for sliding layers).",
        epilog="formats:\n" + "\n".join(f"  {k:<12} {v}" for k, v in FORMATS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="converted checkpoint folder (a run's model/ folder)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="target format (see below)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True,
        help="reload the export and compare with the model (default: on; float32 on the CPU, so a few seconds "
        "for 135M parameters and minutes and 4 bytes/parameter of RAM for billions)",
    )
    p.add_argument("--check-context", type=int, default=None, metavar="N",
                   help="prompt tokens for the check (default: 32 more than the largest window, at least 64)")
    p.add_argument("--json", action="store_true", help="print the parity report as JSON")
    p.set_defaults(func=run)


def resolve_format(model, fmt: str) -> str:
    from ..export.stock import DEFAULT_SWA_FORMAT, model_target

    if fmt != "stock":
        return fmt
    target = model_target(model)
    if target == "mla":
        return "deepseek_v3"
    return DEFAULT_SWA_FORMAT.get(model.config.family, "hf")


def export(model, tokenizer, fmt: str, out, overwrite: bool = False):
    """Write ``model`` in ``fmt``; returns the folder and whether loading it needs remote code."""
    from ..export import save_edited
    from ..export.deepseek import export_deepseek_v3
    from ..export.stock import export_stock_swa

    if fmt == "hf":
        return save_edited(model, out, tokenizer, overwrite=overwrite), True
    if fmt == "deepseek_v3":
        return export_deepseek_v3(model, out, tokenizer, overwrite=overwrite), False
    return export_stock_swa(model, out, fmt, tokenizer, overwrite=overwrite), False


def run(args) -> int:
    from ..errors import AttnEditError
    from ..export.check import check_export
    from ..teachers import load_model

    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise AttnEditError(f"--out {args.out} is a file; give a folder for the export")
    model, tokenizer = load_model(args.model, dtype="auto")
    if getattr(model.config, "model_type", None) != "attnedit":
        raise AttnEditError(f"{args.model} is not an attnedit model; export takes a converted checkpoint folder")
    fmt = resolve_format(model, args.format)
    out, remote = export(model, tokenizer, fmt, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (format {fmt}{', remote code' if remote else ', stock: no remote code'})")
    if args.check:
        report = check_export(model, out, context=args.check_context, remote_code=remote)
        print(report.to_json() if args.json else report.summary())
        if not report.ok:
            raise AttnEditError(f"the export at {out} does not reproduce the model (see the parity report above); please report this")
    return 0
