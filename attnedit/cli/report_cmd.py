"""``attnedit report``: report.md and PNG plots from a run folder."""

from __future__ import annotations

import json

from .common import add_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report.md with quality and efficiency tables and PNG plots",
        description="Read whichever of model/config.json, metrics.jsonl, summary.json, eval.json, bench.json "
        "and passkey.json the run folder holds and write report.md plus PNG plots beside them. A section "
        "whose input is missing names the command that makes it.",
    )
    p.add_argument("run_dir", help="a run folder (written by attnedit convert)")
    add_json(p, "print the written files as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import build_report

    report = build_report(args.run_dir)
    files = [str(report)] + sorted(str(p) for p in report.parent.glob("*.png"))
    print(json.dumps({"report": str(report), "files": files}) if args.json else "\n".join(["wrote:"] + files))
    return 0
