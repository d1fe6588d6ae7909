"""What ``attnedit bench`` prints: a line per measured cell while it runs, and the tables of ``bench.json`` at the
end (decode and TTFT per cell, KV bytes per token, and the serving capacity)."""

from __future__ import annotations

from ...tables import human_bytes, text_table


def progress_line(name: str, run: dict) -> str:
    """The line logged when one engine finishes one cell."""
    f = run.get(name)
    head = f"batch {run['batch']:>4} context {run['context']:>6} {name:>13}: "
    if f is None:
        return head + "out of memory"
    bound = f" ({f['step_over_bound']:.2f}x HBM bound)" if f.get("step_over_bound") else ""
    return head + f"ttft {f['ttft_ms']:.1f} ms, step {f['step_ms']:.3f} ms{bound}, {f['decode_tok_s']:,.0f} tok/s"


def format_bench(result: dict) -> str:
    """The compact table printed at the end of ``attnedit bench``."""

    def get(run, name, key):
        f = run.get(name)
        return None if f is None else f.get(key)

    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    stock = any(r.get("teacher_stock") for r in result["runs"])
    headers = ["batch", "context", "TTFT ms S", "TTFT ms T", "S/T", "tok/s S", "tok/s T"]
    headers += ["tok/s stock"] if stock else []
    headers += ["S/T", "S/stock"] if stock else ["S/T"]
    headers += ["step/bound S", "step/bound T", "KV S", "KV T", "peak S", "peak T"]
    rows = []
    for r in result["runs"]:
        row = [
            r["batch"],
            r["context"],
            num(get(r, "student", "ttft_ms"), "{:,.1f}"),
            num(get(r, "teacher", "ttft_ms"), "{:,.1f}"),
            num(r["ratio"]["ttft_ms"], "{:.2f}"),
            num(get(r, "student", "decode_tok_s"), "{:,.0f}"),
            num(get(r, "teacher", "decode_tok_s"), "{:,.0f}"),
        ]
        if stock:
            row.append(num(get(r, "teacher_stock", "decode_tok_s"), "{:,.0f}"))
        row.append(num(r["ratio"]["decode_tok_s"], "{:.2f}"))
        if stock:
            row.append(num(r.get("ratio_stock", {}).get("decode_tok_s"), "{:.2f}"))
        row += [
            num(get(r, "student", "step_over_bound"), "{:.2f}"),
            num(get(r, "teacher", "step_over_bound"), "{:.2f}"),
            "-" if get(r, "student", "kv_bytes_measured") is None else human_bytes(get(r, "student", "kv_bytes_measured")),
            "-" if get(r, "teacher", "kv_bytes_measured") is None else human_bytes(get(r, "teacher", "kv_bytes_measured")),
            "-" if get(r, "student", "peak_mem_bytes") is None else human_bytes(get(r, "student", "peak_mem_bytes")),
            "-" if get(r, "teacher", "peak_mem_bytes") is None else human_bytes(get(r, "teacher", "peak_mem_bytes")),
        ]
        rows.append(row)
    kv = result["kv"]
    bw = result.get("copy_bandwidth_bytes_s")
    lines = [
        (
            f"device {result['device']}, {result['dtype']}, {result['decode_tokens']} decode tokens, {result['timing']} of "
            f"{result['repeats']}" + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
        ),
        "S = student and T = teacher on attnedit's engine ("
        + result.get("engines", {}).get("student", "")
        + "); stock = "
        + result.get("engines", {}).get("teacher_stock", "not run")
        + "; step/bound = decode step time over (weights + KV bytes) / copy bandwidth (of routed experts, those the batch reaches); "
        "KV = bytes the static cache allocates",
        text_table(headers, rows, right=set(range(len(headers)))),
        "",
        "KV bytes per token: "
        + ", ".join(
            f"{c}: {human_bytes(s)} vs {human_bytes(t)} ({s / t:.1%})"
            for c, s, t in zip(kv["student"]["contexts"], kv["student"]["bytes_per_token"], kv["teacher"]["bytes_per_token"])
        ),
    ]
    for r in result["runs"]:
        for name, best in r.get("largest_batch", {}).items():
            lines.append(f"{name}: batch {r['batch']} at context {r['context']} does not fit; largest that fits: {best}")
    if result.get("capacity"):
        lines += ["", format_capacity(result["capacity"])]
    return "\n".join(lines)


def capacity_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and rows of the serving-capacity table (``bench.json``'s ``capacity``): per context and model, the
    largest batch served, the KV-only limit, decode throughput at that batch and its step over the HBM bound, and
    the student over the teacher (each at its own largest batch). The terminal and the report print the same."""

    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    out = []
    for r in rows:
        for name in ("teacher", "student"):
            c = r.get(name)
            if not c:
                continue
            ratio = r.get("ratio") or {}
            per_seq = c.get("cache_bytes_per_sequence")
            out.append([
                r["context"], name, c["largest_batch"], num(c.get("kv_only_limit"), "{}"), "-" if per_seq is None else human_bytes(per_seq),
                num(c.get("decode_tok_s"), "{:,.0f}"), num(c.get("step_ms"), "{:.2f}"), num(c.get("step_over_bound"), "{:.2f}"),
                "-" if name == "teacher" else num(ratio.get("largest_batch"), "{:.2f}x"),
                "-" if name == "teacher" else num(ratio.get("decode_tok_s"), "{:.2f}x"),
            ])  # fmt: skip
    headers = ["context", "model", "largest batch", "KV-only limit", "cache/seq", "tok/s there", "step ms", "step/bound", "batch S/T", "tok/s S/T"]
    return headers, out


def format_capacity(rows: list[dict]) -> str:
    """The serving-capacity table (:func:`capacity_table`) as aligned text."""
    headers, out = capacity_table(rows)
    return "serving capacity (each model alone on the device; caches + weights + one sequence's chunked prefill)\n" + text_table(
        headers, out, right=set(range(len(headers)))
    )
