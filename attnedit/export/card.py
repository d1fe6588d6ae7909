"""Model cards: the ``README.md`` every converted checkpoint carries, in Hugging Face's model-card format.

YAML front matter (``base_model``, ``library_name``, ``license`` from the teacher where it is known,
``tags``, ``pipeline_tag``), then what the model was converted from and how (target, its settings, the
edited layers, the recipe's stages and data), its KV cache next to the teacher's (from ``eval/kv.py``, the
one source of KV sizes) and, once ``convert`` has evaluated it, the evaluation next to the teacher (held-out
KL/CE, ``eval.json``, ``passkey.json``). ``attnedit edit`` and ``convert`` write it with the model (without
evaluation), ``convert`` writes it again after its evaluation, ``attnedit export`` carries it into the export
with a note on the format.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import write_text
from ..tables import human_bytes, markdown_table

CARD = "README.md"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the smollm2-135m alias's GGUF was quantised from
KV_CONTEXTS = (2048, 8192, 32768)


def _front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``---`` ... ``---``), or {}."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _gguf_license(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # noqa: BLE001 - a card never fails a conversion
        return None


def teacher_metadata(teacher: str | None) -> dict:
    """``base_model`` and ``license`` of a teacher where they are known: a hub id is its own ``base_model``; a
    local folder's model card gives its ``license`` (its ``base_model`` is the folder's own parent, not the
    folder); a GGUF file its ``general.license``; the ``smollm2-135m`` alias is SmolLM2-135M-Instruct."""
    from ..teachers.load import SMOLLM2_ALIAS, resolve

    if not teacher:
        return {}
    out: dict = {}
    try:
        src = resolve(teacher)
    except Exception:  # noqa: BLE001
        return {}
    if teacher == SMOLLM2_ALIAS:
        out["base_model"] = SMOLLM2_HUB_ID
    if src.is_gguf:
        license_ = _gguf_license(Path(src.path) / src.gguf_file)
        if license_:
            out["license"] = license_
        return out
    folder = Path(src.path)
    if folder.is_dir():
        meta = _front_matter((folder / CARD).read_text(errors="replace")) if (folder / CARD).is_file() else {}
        if meta.get("license"):
            out["license"] = meta["license"]
    elif teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")):
        out["base_model"] = teacher  # a hub id
    return out


def _kv_table(config) -> tuple[str, str]:
    """The KV table (bytes per token at a few contexts, next to the teacher's) and the dtype it counts in: the
    model's own, as every command counts it (``eval.kv.cache_bytes``)."""
    from ..eval.kv import cache_bytes, max_context
    from ..targets.modeling_attnedit import base_config_object

    limit = max_context(config) or max(KV_CONTEXTS)
    contexts = [c for c in KV_CONTEXTS if c < limit] + [limit]
    teacher = base_config_object(config.base_config)
    rows, dtype = [], None
    for c in contexts:
        mine = cache_bytes(config, c)
        dtype, s, t = mine.dtype, mine.per_token, cache_bytes(teacher, c, mine.dtype).per_token
        rows.append([f"{c:,}", human_bytes(s), human_bytes(t), f"{100 * s / t:.1f}%", human_bytes(s * c), human_bytes(t * c)])
    headers = ["context (tokens)", "KV bytes/token", "teacher's", "% of teacher", "KV per sequence", "teacher's"]
    return markdown_table(headers, rows), dtype


def _settings_text(settings: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in settings.items() if v is not None)


def _recipe_lines(recipe) -> list[str]:
    """The recipe's stages in a few lines (the whole resolved recipe is in ``attnedit.json``)."""
    if recipe is None:
        return ["- Not trained: this is the edited model as initialised (`attnedit edit`); run `attnedit convert` to train it."]
    lines = []
    for n, st in ((1, recipe.stage1), (2, recipe.stage2)):
        seq = st.seq_len or recipe.data.seq_len
        what = (
            "layer-wise teacher forcing (each new attention on the teacher's own inputs)"
            if n == 1
            else "model-level distillation on the teacher's next-token distributions"
        )
        if st.steps:
            tokens = recipe.stage_tokens(n)
            extra = f", trains {st.trainable}" if n == 2 else ""
            lines.append(f"- Stage {n}, {what}: {st.steps:,} steps x {st.batch_size * st.grad_accum} x {seq:,} tokens = {tokens:,} tokens, lr {st.lr:g}{extra}")
        else:
            lines.append(f"- Stage {n}, {what}: skipped")
    files = ", ".join(Path(f).name for f in recipe.data.files) or "-"
    lines.append(f"- Data: {files}")
    return lines


def _results_sections(run_dir: Path | None) -> list[str]:
    """The evaluation next to the teacher, from the run folder's result records (none: no section)."""
    from ..results import Passkey, Quality, Summary

    if run_dir is None:
        return []
    out = []
    summary = Summary.read(run_dir)
    if summary is not None and summary.heldout_after is not None:
        before, after = summary.heldout_before, summary.heldout_after

        def pair(name, before=before, after=after):
            earlier = getattr(before, name) if before is not None else None
            return ["-" if earlier is None else earlier, getattr(after, name)]

        rows = [["KL(teacher ‖ model)", *pair("kl")], ["cross-entropy (model)", *pair("student_ce")], ["cross-entropy (teacher)", *pair("teacher_ce")]]
        long_after = summary.heldout_after_long
        if long_after is not None:  # the same text in blocks of the longest training sequence
            rows.append([f"KL(teacher ‖ model), {long_after.seq_len:,}-token blocks", *pair("kl", summary.heldout_before_long, long_after)])
        out += ["### Held-out text (the run's own held-out blocks)", "", markdown_table(["", "before training", "after"], rows), ""]
    quality = Quality.read(run_dir)
    if quality is not None and quality.tasks:
        from ..eval.quality import quality_rows

        rows = quality_rows(quality.to_dict())
        out += ["### Quality next to the teacher (`eval.json`)", "", markdown_table(["task", "metric", "model", "teacher", "model/teacher"], rows), ""]
    passkey = Passkey.read(run_dir)
    if passkey is not None and passkey.student:
        rows = [["this model" if name == "student" else "teacher", c] + [f"{a:.2f}" for a in passkey.grid(name)[c].values()]
                for name in ("student", "teacher") if getattr(passkey, name) for c in passkey.contexts]  # fmt: skip
        headers = ["model", "context"] + [f"depth {d:g}" for d in passkey.depths]
        out += ["### Passkey retrieval, accuracy per cell (`passkey.json`)", "", markdown_table(headers, rows), ""]
    return (["## Evaluation", ""] + out) if out else []


def model_card(config, teacher: str | None = None, recipe=None, run_dir: Path | None = None) -> str:
    """The model card of an edited model's ``config``; ``teacher``: how the teacher was named (a hub id, folder,
    .gguf or alias); ``recipe``: the resolved recipe of a ``convert`` run; ``run_dir``: its folder, whose result
    files (when present) give the evaluation."""
    from .. import __version__
    from ..surgery.api import TARGETS, get_target

    edit = getattr(config, "edit", None) or {}
    target = edit.get("target", "?")
    teacher = teacher or (recipe.teacher if recipe is not None else None)
    meta = teacher_metadata(teacher)
    front = {}
    if meta.get("base_model"):
        front["base_model"] = meta["base_model"]
    front["library_name"] = "transformers"
    if meta.get("license"):
        front["license"] = meta["license"]
    front["tags"] = ["attnedit", f"attention-{target}", "kv-cache-compression", "distillation"]
    front["pipeline_tag"] = "text-generation"
    import yaml

    teacher_name = meta.get("base_model") or teacher or "its teacher"
    what = get_target(target).help if target in TARGETS else target
    layers = edit.get("edited_layers", [])
    n = len(getattr(config, "layer_attention", []))
    kv_table, kv_dtype = _kv_table(config)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {teacher_name}, attention converted to {target.upper() if len(target) <= 4 else target}",
        "",
        (
            f"This is **{teacher_name}** (a {getattr(config, 'family', '?')}-family causal LM) with the attention of "
            f"{len(layers)} of its {n} layers replaced by **{target}**: {what}. Everything else (embeddings, norms, "
            "MLPs, LM head) is the teacher's. It was converted by attnedit's attention editing (arXiv 2604.05688): the "
            "new attention is initialised, then trained by distillation from the teacher, without pre-training again."
        ),
        "",
        "## Conversion",
        "",
        f"- Teacher: `{teacher or '?'}`",
        f"- Target: `{target}` with {_settings_text(edit.get('settings', {})) or 'its defaults'}",
        f"- Edited layers: {_layer_ranges(layers)} of 0-{n - 1}; {_layer_text(config, layers)}",
        *_recipe_lines(recipe),
        f"- attnedit {__version__}; the resolved settings{' and recipe' if recipe is not None else ''} are in `attnedit.json`",
        "",
        "## KV cache",
        "",
        f"Bytes the cache holds per token of context ({kv_dtype}, all layers), next to the teacher's:",
        "",
        kv_table,
        "",
        *_results_sections(run_dir),
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>", trust_remote_code=True)',
        "```",
        "",
        (
            "The modeling code is in this folder (it needs only torch and transformers); `generate()` uses the "
            "compressed cache. `attnedit export` writes stock formats where one exists (`attnedit export --help`)."
        ),
        "",
    ]
    return "\n".join(lines)


def _layer_text(config, layers: list[int]) -> str:
    """What an edited layer is, as resolved from the settings (``layer_attention`` in ``config.json``)."""
    plans = [{k: v for k, v in config.layer_attention[i].items() if k != "kind"} for i in layers]
    if not plans:
        return "none"
    if all(p == plans[0] for p in plans):
        return f"each: {_settings_text(plans[0])}"
    keys = [k for k in dict.fromkeys(k for p in plans for k in p) if any(p.get(k) != plans[0].get(k) for p in plans)]
    return f"per layer ({', '.join(keys)} vary: `layer_attention` in config.json), first: {_settings_text(plans[0])}"


def _layer_ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


def write_card(folder: str | os.PathLike, config, teacher: str | None = None, recipe=None, run_dir: Path | None = None) -> Path:
    """Write (atomically) ``folder/README.md``; see :func:`model_card`."""
    return write_text(Path(folder) / CARD, model_card(config, teacher, recipe, run_dir))


def carry_card(model, folder: str | os.PathLike, fmt: str) -> Path:
    """Give an export the model card of the folder ``model`` was loaded from (a new one if it has none): as it
    is for ``hf`` (the same format), else with a section on the export's format before the rest and a tag."""
    source = Path(getattr(model, "name_or_path", "") or "") / CARD
    if fmt == "hf":
        return write_text(Path(folder) / CARD, source.read_text()) if source.is_file() else Path(folder) / CARD
    text = source.read_text() if source.is_file() else model_card(model.config)
    front = _front_matter(text)
    body = text[text.find("\n---", 3) + 4 :].lstrip("\n") if front else text
    front.setdefault("tags", [])
    front["tags"] = [*front["tags"], f"format-{fmt}"]
    import yaml

    base_type = (getattr(model.config, "base_config", None) or {}).get("model_type", "?")
    what = f"a stock checkpoint of the teacher's own architecture (`{base_type}`)" if fmt == "teacher" else f"a stock `{fmt}` checkpoint"
    note = [
        "## This export",
        "",
        (
            f"Written by `attnedit export --format {fmt}`: {what} that transformers loads without "
            "remote code (`trust_remote_code` is not needed), checked against the converted model (float32 logits, a "
            "greedy generation, the cache's bytes). What follows describes the converted model it was written from."
        ),
        "",
    ]
    title_end = body.find("\n\n", body.find("# ")) if body.startswith("# ") else 0
    body = body[: title_end + 2] + "\n".join(note) + "\n" + body[title_end + 2 :] if title_end > 0 else "\n".join(note) + "\n" + body
    text = "---\n" + yaml.safe_dump(front, sort_keys=False).strip() + "\n---\n\n" + body
    return write_text(Path(folder) / CARD, text)
