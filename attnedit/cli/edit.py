"""``attnedit edit``: build the edited, untrained model from a teacher and save it."""

from __future__ import annotations

import argparse

from ..errors import AttnEditError
from ..io import check_output
from ..schema import add_flags, from_args
from ..surgery import SETTINGS, field_help
from .common import add_device_args, add_out, add_overwrite, add_set, device_of, load_dtype, log, parse_sets


def _settings_epilog() -> str:
    lines = ["target settings (--set key=value):"]
    for target, cls in SETTINGS.items():
        lines.append(f"  {target}:")
        for name, text, default in field_help(cls):
            lines.append(f"    {name:<18} {text} [default: {default}]")
    lines += [
        "",
        "examples:",
        "  attnedit edit smollm2-135m --target mla --out runs/smol-mla-init",
        "  attnedit edit Qwen/Qwen3-8B --target gateswa --set window=1024 --set full_layers=every:6 --out runs/q8-gs",
        "  attnedit edit ./my-llama --target mla --set kv_lora_rank=256 --set init=teacher --set layers=4-27 --out runs/x",
    ]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="replace a teacher's attention with a target (untrained) and save the model",
        description="Replace the attention of the chosen layers with a new target module and save the "
        "edited model as a Hugging Face checkpoint (remote code included). Nothing is trained yet.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..eval.inspect import InspectSettings

    p.add_argument("teacher", help="Hugging Face id, local folder, .gguf file, or smollm2-135m (the default teacher)")
    p.add_argument("--target", required=True, choices=sorted(SETTINGS), help="the new attention")
    add_set(p, "a target setting, e.g. kv_lora_rank=128 (listed below)")
    add_out(p, "folder for the edited checkpoint")
    add_overwrite(p)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer saved with the model (folder or Hugging Face id; default: the teacher's own)")
    add_flags(p, InspectSettings, skip=("dtype",))  # --context of the KV summary printed at the end
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.inspect import InspectSettings, format_inspection, inspect_config
    from ..export import save_edited
    from ..surgery import edit_model, edited_config
    from ..teachers import load_config, load_model, load_tokenizer

    target_args = parse_sets(args.set)
    context = from_args(InspectSettings, args, dtype=None).context
    # the output is checked before anything is loaded: a path that cannot be written, or the teacher itself
    check_output(args.out, overwrite=args.overwrite, inputs=(args.teacher, args.tokenizer))
    edited_config(load_config(args.teacher), args.target, target_args)  # validate before loading weights
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    teacher, teacher_tokenizer = load_model(args.teacher, dtype=load_dtype(args.dtype), device=device_of(args))
    tokenizer = tokenizer or teacher_tokenizer
    if tokenizer is not None and len(tokenizer) > teacher.config.vocab_size:
        raise AttnEditError(
            f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens, more than the teacher's vocabulary "
            f"({teacher.config.vocab_size}); give the teacher's own tokenizer"
        )
    student = edit_model(teacher, args.target, target_args)
    out = save_edited(student, args.out, tokenizer, overwrite=args.overwrite, teacher=args.teacher)
    print(format_inspection(inspect_config(student.config, context)))
    print(f"\nsaved the edited (untrained) model to {out}")
    if tokenizer is None:
        log(
            f"attnedit: warning: {args.teacher} has no tokenizer, so {out} has none: eval, passkey and generate() "
            f"need one; run edit again with --tokenizer (a tokenizer folder or Hugging Face id)"
        )
    return 0
