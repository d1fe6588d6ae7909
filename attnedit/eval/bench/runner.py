"""The bench's run: every (batch, context) cell for each engine, in one process, and ``bench.json`` from them.

Each engine runs the whole grid in turn, the teacher on attnedit's engine first (a run cut short still has every
ratio of the students it finished); the teacher's engines are timed once for all the students of a run. The
figures of a cell are the package docstring's; a cell that does not fit in memory is null, with the largest batch
that fits at its context (:func:`.capacity.largest_fit`). ``settings.capacity`` adds each model's serving capacity
(:func:`.capacity.measure_capacity`). Every result is typed by :class:`attnedit.results.Bench`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ...errors import AttnEditError
from ...results import Bench
from ..kv import analytic_cache_bytes, kv_by_context
from ..models import check_contexts, check_pair
from .capacity import capacity_rows, fits, largest_fit, measure_capacity
from .engines import AttnEditEngine, StockEngine, run_once, set_engine_options
from .format import progress_line
from .settings import BenchSettings
from .timing import bytes_per_step, copy_bandwidth

FIGURES = (
    "ttft_ms",
    "step_ms",
    "decode_tok_s",
    "hbm_bound_ms",
    "step_over_bound",
    "peak_mem_bytes",
    "kv_bytes_measured",
    "kv_bytes_analytic",
)


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def ratios(student: dict | None, teacher: dict | None) -> dict:
    """Each of :data:`FIGURES`, student over teacher (None where either is missing)."""
    if student is None or teacher is None:
        return {k: None for k in FIGURES}
    return {k: _ratio(student.get(k), teacher.get(k)) for k in FIGURES}


def run_bench(student, teacher, settings: BenchSettings, dtype: str, log: Callable[[str], None] = print) -> dict:
    """Every (batch, context) cell for the three engines, as ``bench.json``::

    {"device", "dtype", "decode_tokens", "repeats", "timing", "copy_bandwidth_bytes_s",
     "kv": {"student"|"teacher": {"contexts": [...], "bytes_per_token": [...]}, "ratio": [...]},
     "runs": [{"batch", "context", "student"|"teacher"|"teacher_stock": {FIGURES...} | null,
               "ratio": {figure: student / teacher}, "ratio_stock": {figure: student / teacher_stock},
               "largest_batch": {engine: int} (when one did not fit)}]}
    """
    return run_bench_many({"student": student}, teacher, settings, dtype, log)["student"]


def run_bench_many(
    students: dict,
    teacher,
    settings: BenchSettings,
    dtype: str,
    log: Callable[[str], None] = print,
    partial: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """``run_bench`` for several students of one teacher in one run: the teacher's two engines are timed
    once per cell and shared by every student's result (one ``bench.json`` each, keyed by ``students``'
    names), so each ratio is still taken in the same run while the teacher (and the stock path's
    per-shape compilation) is paid for once. ``partial`` gets the results so far (``"partial": true``)
    after every engine, so a run cut short keeps what it measured."""
    from ...surgery import teacher_on_attnedit

    if not settings.contexts or not settings.batches:
        raise AttnEditError("bench needs at least one context and one batch size")
    for label, student in students.items():
        check_pair(student, teacher)
        check_contexts(student.config, settings.contexts, f"the model {label}" if len(students) > 1 else "the student")
    check_contexts(teacher.config, settings.contexts, "the teacher")
    device = next(teacher.parameters()).device
    compile_ = settings.compile if settings.compile is not None else device.type == "cuda"
    bandwidth = copy_bandwidth(device)
    # the teacher first: a run cut short still has every ratio of the students it finished
    engines = {"teacher": AttnEditEngine(teacher_on_attnedit(teacher), compile_)}
    engines.update({label: AttnEditEngine(model, compile_) for label, model in students.items()})
    set_engine_options(engines, settings.fuse_projections, settings.compile_prefill, settings.fold_absorbed)  # one path for both
    if settings.stock:
        engines["teacher_stock"] = StockEngine(teacher)
    configs = {label: model.config for label, model in students.items()}
    configs.update(teacher=teacher.config, teacher_stock=teacher.config)
    timed: dict[str, dict[tuple[int, int], dict | None]] = {}
    largest: dict[tuple[int, int], dict[str, int]] = {}
    header = _header(device, dtype, settings, compile_, bandwidth)
    student_kv = {label: kv_by_context(configs[label], settings.contexts, dtype) for label in students}
    teacher_kv = kv_by_context(teacher.config, settings.contexts, dtype)

    capacity: dict[tuple[str, int], dict] = {}

    def assemble() -> dict[str, dict]:
        return _assemble(header, student_kv, teacher_kv, settings, timed, largest, capacity)

    try:
        for name, engine in engines.items():
            if compile_:
                torch._dynamo.reset()  # each engine compiles its own step; stale graphs would count against the limit
            limits: dict[int, tuple[int, int]] = {}  # context -> (largest fit, smallest failure)
            timed[name] = {}
            role = name if name in ("teacher", "teacher_stock") else "student"
            label = name if len(students) > 1 else role
            for batch in settings.batches:  # batch-major: the compiled step re-specialises on batch 1 only once
                for context in settings.contexts:
                    if name == "teacher_stock" and settings.stock_cells is not None and (batch, context) not in settings.stock_cells:
                        continue
                    if name == "teacher_stock" and compile_:
                        torch._dynamo.reset()  # stock compiles per shape; keep every cell within the recompile limit
                    figures = _cell(engine, batch, context, settings, limits.get(context))
                    if isinstance(figures, int):
                        limits[context] = (figures, min(batch, limits.get(context, (0, batch))[1]))
                        largest.setdefault((batch, context), {})[name] = figures
                        log(f"{name}: batch {batch} at context {context} does not fit in memory; the largest that fits is {figures}")
                        figures = None
                    else:
                        need = bytes_per_step(engine.model, configs[name], batch, context, dtype)
                        figures["kv_bytes_analytic"] = analytic_cache_bytes(configs[name], figures["kv_tokens"], batch, dtype)
                        figures["bytes_per_step"] = need
                        figures["hbm_bound_ms"] = need / bandwidth * 1e3 if bandwidth else None
                        figures["step_over_bound"] = _ratio(figures["step_ms"], figures["hbm_bound_ms"])
                    timed[name][(batch, context)] = figures
                    log(progress_line(label, {"batch": batch, "context": context, label: figures}))
            if partial is not None and (name != list(engines)[-1] or settings.capacity):
                partial({k: {**v, "partial": True} for k, v in assemble().items()})
        if settings.capacity:
            capacity.update(measure_capacity(engines, settings, dtype, device, log, bandwidth))
        return assemble()
    finally:  # the models leave as they came: unfused, unfolded, prefill eager (a later passkey run uses them)
        set_engine_options(engines, False, False)


def _header(device, dtype: str, settings: BenchSettings, compile_: bool, bandwidth) -> dict:
    """What every ``bench.json`` of one run says about the run itself."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": dtype,
        "decode_tokens": settings.decode_tokens,
        "repeats": settings.repeats,
        "timing": "CUDA events, medians" if cuda else "wall clock, medians",
        "engines": {
            "student": "attnedit static cache"
            + (" + torch.compile (CUDA graphs)" if compile_ else ", eager")
            + (", fused projections" if settings.fuse_projections else "")
            + (", compiled prefill" if settings.compile_prefill else "")
            + (", MLA decode folded" if settings.fold_absorbed else ""),
            "teacher": "the teacher on the same engine as the student",
            "teacher_stock": "transformers generate(cache_implementation='static')" + (" + automatic torch.compile" if cuda else ""),
        },
        "copy_bandwidth_bytes_s": bandwidth,
    }


def _assemble(
    header: dict, student_kv: dict, teacher_kv: dict, settings: BenchSettings, timed: dict, largest: dict, capacity: dict | None = None
) -> dict[str, dict]:
    """One ``bench.json`` per student (``student_kv``'s keys) from the engines' timings so far (an engine
    not yet run: null)."""
    results = {}
    for label, kv in student_kv.items():
        result = {**header, "kv": {"student": kv, "teacher": teacher_kv}, "runs": []}
        if len(student_kv) > 1:
            result["benched_with"] = [other for other in student_kv if other != label]
        result["kv"]["ratio"] = [_ratio(s, t) for s, t in zip(kv["bytes_per_token"], teacher_kv["bytes_per_token"])]
        for context in settings.contexts:
            for batch in settings.batches:
                run = {
                    "batch": batch,
                    "context": context,
                    "student": timed.get(label, {}).get((batch, context)),
                    "teacher": timed.get("teacher", {}).get((batch, context)),
                    "teacher_stock": timed.get("teacher_stock", {}).get((batch, context)),
                }
                fails = {("student" if n == label else n): b for n, b in largest.get((batch, context), {}).items() if n in (label, "teacher", "teacher_stock")}
                if fails:
                    run["largest_batch"] = fails
                run["ratio"] = ratios(run["student"], run["teacher"])
                run["ratio_stock"] = ratios(run["student"], run["teacher_stock"])
                result["runs"].append(run)
        if capacity:
            result["capacity"] = capacity_rows(label, settings.contexts, capacity)
        results[label] = Bench.model_validate(result).to_dict()  # the bench.json layout, as its record types it
    return results


def _cell(engine, batch: int, context: int, settings: BenchSettings, known: tuple[int, int] | None) -> dict | int:
    """The figures of one cell, or (when it does not fit) the largest batch that fits at this context.

    ``known`` is (largest fit, smallest failure) from an earlier batch at the same context, if any.
    """
    if known and batch >= known[1]:
        return known[0]
    figures = fits(lambda: run_once(engine, batch, context, settings))
    if figures is not None:
        return figures
    quick = dataclasses.replace(settings, decode_tokens=2, repeats=1)

    def ok(b: int) -> bool:
        return fits(lambda: run_once(engine, b, context, quick)) is not None

    return largest_fit(ok, batch)
