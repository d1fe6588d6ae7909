"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed).

Each function takes the run's data (parsed ``metrics.jsonl``, the ``bench.json`` / ``passkey.json``
records of :mod:`attnedit.results`, or KV series) and writes one PNG. Student is drawn in one colour and the teacher in grey throughout.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MultipleLocator

from ..results import Bench, Passkey

STUDENT, TEACHER = "#1f6fb4", "#7f7f7f"
DPI = 120


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bytes_label(n: float, _pos=None) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if n == int(n) else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:g}"


def _count_label(n: float, _pos=None) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def _context_label(n: float, _pos=None) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _plain_log_axis(axis, lo: float, hi: float) -> None:
    """Plain numbers (0.2, 3) instead of powers of ten; minor ticks labelled only when the data span < 20x."""
    short = lo > 0 and hi / lo < 20

    def minor(v, _p):
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if short and lead in (2, 3, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


EXTRA_TERMS = ("kl", "ce", "feature")  # stage-2 loss terms, drawn beside the total when logged
TERM_COLORS = tuple(matplotlib.colormaps["Dark2"].colors[i] for i in (1, 0, 2))  # Dark2's orange, green and purple
LAYER_KEYS = ("layer_rel_err", "layer_loss")  # stage-1 per-layer figures (lists, one value per edited layer)


def loss_curves(records: list[dict], path: Path) -> Path:
    """One panel per stage (loss and any logged terms against tokens seen, log scale when positive), plus
    one panel of stage 1's per-layer figures when they were logged."""
    stages = sorted({r["stage"] for r in records})
    stage1 = [r for r in records if r["stage"] == "stage1"]
    layer_key = next((k for k in LAYER_KEYS if stage1 and all(isinstance(r.get(k), list) for r in stage1)), None)
    panels = len(stages) + (layer_key is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r["stage"] == stage]
        xkey = "tokens" if all("tokens" in r for r in rows) else "step"
        xs = [r[xkey] for r in rows]
        ax.plot(xs, [r["loss"] for r in rows], color=STUDENT, lw=1.6, label="loss")
        values = [r["loss"] for r in rows]
        for term, color in zip(EXTRA_TERMS, TERM_COLORS):
            if all(isinstance(r.get(term), (int, float)) for r in rows):
                ax.plot(xs, [r[term] for r in rows], "--", color=color, lw=1.1, label=term)
                values += [r[term] for r in rows]
        if all(v > 0 for v in values):
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis, min(values), max(values))
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=8)
        ax.set_title(stage)
        ax.set_xlabel("tokens seen" if xkey == "tokens" else "step")
        ax.set_ylabel("loss")
        ax.xaxis.set_major_formatter(FuncFormatter(_count_label))
        ax.grid(True, which="both", alpha=0.3)
    if layer_key is not None:
        ax = axes[0][-1]
        xkey = "tokens" if all("tokens" in r for r in stage1) else "step"
        n = len(stage1[-1][layer_key])
        cmap = plt.get_cmap("viridis")
        for i in range(n):
            pts = [(r[xkey], r[layer_key][i]) for r in stage1 if len(r[layer_key]) == n]
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=cmap(i / max(1, n - 1)), lw=0.9)
        layer_values = [v for r in stage1 for v in r[layer_key]]
        if all(v > 0 for v in layer_values):
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis, min(layer_values), max(layer_values))
        ax.set_title(f"stage1 per layer: {layer_key} (dark = first layer)", fontsize=10)
        ax.set_xlabel("tokens seen" if xkey == "tokens" else "step")
        ax.xaxis.set_major_formatter(FuncFormatter(_count_label))
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def kv_vs_context(contexts: list[int], student: list[float], teacher: list[float], dtype: str, path: Path) -> Path:
    """KV cache per sequence and per token against context, student vs teacher (from the configs)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for ax, scale in ((left, True), (right, False)):
        for ys, label, color in ((teacher, "teacher", TEACHER), (student, "student", STUDENT)):
            values = [y * c for y, c in zip(ys, contexts)] if scale else ys
            ax.plot(contexts, values, marker="o", ms=3.5, lw=1.6, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_context_label))
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log", base=2)
    left.set_title(f"KV cache per sequence ({dtype})")
    left.yaxis.set_major_formatter(FuncFormatter(_bytes_label))
    right.set_title("KV cache per token")
    right.set_ylim(0, max(teacher + student) * 1.1)
    right.yaxis.set_major_formatter(FuncFormatter(_bytes_label))
    right.yaxis.set_major_locator(MultipleLocator(2 ** math.floor(math.log2(max(teacher + student) / 5))))
    right.annotate(
        f"{student[-1] / teacher[-1]:.0%} of the teacher",
        (contexts[-1], student[-1]),
        xytext=(-4, -16),
        textcoords="offset points",
        ha="right",
        color=STUDENT,
        fontsize=9,
    )
    left.legend()
    return _save(fig, path)


def speed_vs_batch(bench: Bench, path: Path) -> Path:
    """Decode tokens/s and time to first token against batch, one line per context; student solid, teacher dashed."""
    contexts = sorted({r.context for r in bench.runs})
    cmap = plt.get_cmap("viridis")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.0), layout="constrained")
    for i, context in enumerate(contexts):
        color = cmap(i / max(1, len(contexts) - 1) * 0.85)
        runs = sorted((r for r in bench.runs if r.context == context), key=lambda r: r.batch)
        for name, style in (("student", "-"), ("teacher", "--")):
            pts = [(r.batch, getattr(r, name)) for r in runs if getattr(r, name)]
            if not pts:
                continue
            label = f"{name}, {_context_label(context)}"
            left.plot(
                [b for b, _ in pts],
                [f.decode_tok_s for _, f in pts],
                style,
                marker="o",
                ms=3.5,
                color=color,
                label=label,
            )
            right.plot([b for b, _ in pts], [f.ttft_ms for _, f in pts], style, marker="o", ms=3.5, color=color, label=label)
    for ax, title, unit in ((left, "decode throughput", "tokens / s"), (right, "time to first token", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_count_label))
        ax.yaxis.set_major_formatter(FuncFormatter(_count_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
        ax.set_title(f"{title} ({bench.device or '?'}, {bench.dtype or '?'})", fontsize=10)
        ax.set_xlabel("batch")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(
        *left.get_legend_handles_labels(),
        loc="outside right upper",
        fontsize=8,
        title="model, context",
        title_fontsize=8,
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def passkey_heatmaps(passkey: Passkey, path: Path) -> Path:
    """Accuracy per (context, depth), student and teacher side by side, annotated."""
    names = [n for n in ("student", "teacher") if getattr(passkey, n) is not None]
    contexts, depths = passkey.contexts, passkey.depths
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(1.1 * len(depths) * len(names) + 2.6, 0.5 * len(contexts) + 1.6),
        squeeze=False,
        sharey=True,
    )
    image = None
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        grid = getattr(passkey, name)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{acc:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if acc < 0.15 or acc > 0.85 else "black",
                )
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(contexts)), [_context_label(c) for c in contexts])
        ax.set_xlabel("depth of the key (0 = start, 1 = end)")
        if k == 0:
            ax.set_ylabel("context (tokens)")
        ax.set_title(f"{name}: passkey accuracy ({passkey.trials} trials/cell)", fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
