"""``attnedit report``: report.md and PNG plots from a run folder, or several run folders side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import AttnEditError
from .common import add_json, add_out

DESCRIPTION = """\
One RUN: read whichever of model/config.json, metrics.jsonl, summary.json, eval.json, bench.json and
passkey.json the run folder holds and write RUN/report.md plus PNG plots beside them. A section whose
input is missing names the command that makes it.

Several RUNs (or --compare): write one Markdown file (--out) comparing them, one row per run, for
ablation tables: a runs table (the settings that differ between the runs, tokens per stage, KV cache
as % of the teacher's, held-out KL, WikiText-2 perplexity per window with its change vs the teacher,
mean zero-shot accuracy with its difference in points, passkey accuracy per context), each stage's
speed (tokens/s and its ratio to the teacher's forward) and, from a GPU run, its peak memory next to
the memory plan's estimate, zero-shot accuracy per task, and each run's passkey grid. Figures come
from the run folders' files only; no model is loaded. Zero-shot accuracy is acc_norm where a task
reports it, else acc.

examples:
  attnedit report runs/smol-mla
  attnedit report runs/mla-teacher runs/mla-random runs/mla-s2only --out runs/mla-ablation.md
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN/report.md with quality and efficiency tables and PNG plots; several RUNs: a comparison",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="+", metavar="RUN", help="a run folder (written by attnedit convert); several to compare them")
    p.add_argument(
        "--compare",
        action="store_true",
        help="write the comparison even for one RUN (several RUNs always compare)",
    )
    add_out(p, "the comparison's Markdown file, e.g. runs/ablation.md (needed to compare; one RUN without "
            "--compare writes RUN/report.md)", required=False, metavar="FILE.md")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the comparison's --out FILE.md if it exists")
    add_json(p, "print the written files as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io import check_output
    from ..report import build_report, compare_runs
    from ..report.build import INPUTS, check_run_dir

    if args.compare or len(args.run_dir) > 1:
        if not args.out:
            raise AttnEditError("comparing runs writes one Markdown file: give it with --out FILE.md")
        if not Path(args.out).is_dir():  # (a folder is named by compare_runs)
            inputs = tuple(Path(r) / name for r in args.run_dir for name in (*INPUTS, "recipe.yaml", "model"))
            check_output(args.out, folder=False, overwrite=args.overwrite, inputs=inputs)
        report = compare_runs(args.run_dir, args.out)
        files = [str(report)]
    else:
        if args.out:
            raise AttnEditError("--out is for comparisons (several RUNs or --compare); one run's report is RUN/report.md")
        run = check_run_dir(args.run_dir[0])
        check_output(run / "report.md", "the report", folder=False, overwrite=True)  # rewritten each time: made from RUN's files
        report = build_report(run)
        files = [str(report)] + sorted(str(p) for p in report.parent.glob("*.png"))
    print(json.dumps({"report": str(report), "files": files}) if args.json else "\n".join(["wrote:"] + files))
    return 0
