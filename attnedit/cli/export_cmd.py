"""``attnedit export``: write a converted model in a format serving engines load natively."""

from __future__ import annotations

import argparse

FORMATS = {
    "deepseek_v3": "stock DeepSeek-V3 (all-MLA models): transformers without remote code, vLLM, SGLang",
    "hf": "Hugging Face folder with attnedit's remote code (what convert writes)",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a converted model in a serving format (deepseek_v3 for MLA)",
        description="Write a converted model in a format other tools load. Each export is checked: "
        "deepseek_v3 reloads with transformers' DeepseekV3ForCausalLM and must give the attnedit "
        "model's logits.",
        epilog="formats:\n" + "\n".join(f"  {k:<12} {v}" for k, v in FORMATS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="converted checkpoint folder (a run's model/ folder)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="target format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-check", action="store_true", help="skip the reload-and-compare parity check")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..errors import AttnEditError
    from ..export import save_edited
    from ..export.deepseek import export_deepseek_v3
    from ..teachers import load_model

    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise AttnEditError(f"--out {args.out} is a file; give a folder for the export")
    model, tokenizer = load_model(args.model, dtype="auto")
    if getattr(model.config, "model_type", None) != "attnedit":
        raise AttnEditError(f"{args.model} is not an attnedit model; export takes a converted checkpoint folder")
    if args.format == "hf":
        out = save_edited(model, args.out, tokenizer, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    out = export_deepseek_v3(model, args.out, tokenizer, overwrite=args.overwrite)
    if not args.no_check:
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(out, dtype=next(model.parameters()).dtype).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 32))
        with torch.no_grad():
            a, b = model(ids).logits.float(), stock(ids).logits.float()
        err = ((a - b).norm() / a.norm()).item()
        print(f"parity: {type(stock).__name__} vs attnedit, relative logit error {err:.2e}")
        if err > 1e-2:
            raise AttnEditError(f"the export does not reproduce the model (relative error {err:.2e}); please report this")
    print(f"wrote {out} (model_type deepseek_v3; serve with vLLM/SGLang or load with transformers)")
    return 0
