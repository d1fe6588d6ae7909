"""Time to first token and prefill peak memory against ``model.prefill_chunk``, for a teacher built from a config
with random weights and its students edited in memory from recipes (as benchmarks/serving_at_scale.py).

    python benchmarks/prefill_chunk.py tests/assets/qwen3-8b recipes/qwen3-8b-gateswa.yaml recipes/qwen3-8b-mla.yaml \\
        --context 32768 --chunks 8192,16384,0 [--profile] [--json OUT.json]

``--profile`` adds where each prefill's time goes: one prefill under ``torch.profiler`` per model and chunk size,
device milliseconds by kernel family (attention, GEMM, copies, element-wise) and its costliest kernels, so a chunked
prefill's cost over one piece can be read kernel by kernel. ``--device cpu`` runs the same on the CPU (a check of
the script on a small config; its times are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from serving_at_scale import random_students, random_teacher, read_recipes

from attnedit.eval.bench import Clock
from attnedit.eval.generation import next_token
from attnedit.profiling import profile_steps
from attnedit.surgery import teacher_on_attnedit


def measure(model, ids: torch.Tensor, max_length: int, device: torch.device, repeats: int = 3, profile: bool = False) -> dict:
    """Median TTFT of ``repeats`` prefills, each into a static cache made before its clock starts (the first one's
    time too: compilation included), the peak memory over what was allocated then (weights and cache; GPU only),
    and with ``profile`` the profile of one more."""
    times, peak = [], None
    cuda = device.type == "cuda"
    for _ in range(repeats):
        cache = model.new_cache(static=True, batch_size=ids.shape[0], max_length=max_length)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        clock = Clock(device)
        clock.mark()
        with torch.no_grad():
            next_token(model, ids, cache)
        clock.mark()
        times.append(clock.intervals_ms()[0])
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        del cache
    result = {"ttft_ms": sorted(times)[len(times) // 2], "first_ms": times[0], "peak_gib_over_weights": peak}
    if profile:
        cache = model.new_cache(static=True, batch_size=ids.shape[0], max_length=max_length)
        with torch.no_grad():
            result["profile"] = profile_steps(lambda: next_token(model, ids, cache), 1, device)
    return result


def format_profile(name: str, chunk: int, prof: dict) -> str:
    kinds = ", ".join(f"{k} {v['ms_per_step']:.1f} ms ({v['per_step']:.0f})" for k, v in prof["by_kind"].items())
    top = "\n".join(f"      {t['ms_per_step']:9.2f} ms {t['per_step']:6.0f}x  {t['kernel']}" for t in prof["top"][:5])
    return f"  {name} chunk {chunk}: {prof['device_ms_per_step']:.1f} ms of {prof['what']}, {prof['kernels_per_step']:.0f} of them: {kinds}\n{top}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="folder with the teacher's config.json")
    p.add_argument("recipes", nargs="+", help="recipes whose target and target_args make the students; RECIPE+KEY=VALUE[+...] changes settings")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--chunks", default="8192,16384,0", help="prefill_chunk values; 0 = the whole prompt at once")
    p.add_argument("--profile", action="store_true", help="also profile one prefill per model and chunk size")
    p.add_argument("--json", default=None, help="write every figure (and profile) to this file")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of the script)")
    args = p.parse_args(argv)
    recipes = read_recipes(p, args.recipes)  # every recipe and chunk size is read before anything is built
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        p.error(f"--chunks: comma-separated token counts (0 = the whole prompt at once), got {args.chunks!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("it measures on a CUDA GPU, and torch sees none here (--device cpu checks the script)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = random_teacher(args.config, dtype, args.device)
    models = {"teacher": teacher_on_attnedit(teacher), **random_students(teacher, recipes)}
    ids = torch.randint(3, teacher.config.vocab_size, (1, args.context), device=device)
    rows = []
    print(f"{'model':>8} {'chunk':>6} {'TTFT ms':>9} {'peak GiB over weights':>22} {'first call ms':>14}")
    for name, model in models.items():
        for chunk in chunks:
            model.prefill_chunk = chunk or None
            row = {"model": name, "chunk": chunk, **measure(model, ids, args.context + 8, device, profile=args.profile)}
            rows.append(row)
            peak = f"{row['peak_gib_over_weights']:.2f}" if row["peak_gib_over_weights"] is not None else "-"
            print(f"{name:>8} {chunk:>6} {row['ttft_ms']:>9.1f} {peak:>22} {row['first_ms']:>14.0f}", flush=True)
    if args.profile:
        print("\nwhere each prefill's time goes (one prefill each):")
        for row in rows:
            print(format_profile(row["model"], row["chunk"], row["profile"]))
    if args.json:
        meta = {"config": args.config, "recipes": args.recipes, "context": args.context, "device": str(device)}
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(device)
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
