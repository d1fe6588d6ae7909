"""One home per thing: provenance beside checkpoints, old configs still load, gradient checkpointing
changes nothing but memory, the atomic-I/O and hook helpers, the content-keyed GGUF cache, and the package's
layers importing downward only, with no import circle between modules."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_ids, tiny_teacher

import attnedit
from attnedit.errors import AttnEditError
from attnedit.export import save_edited
from attnedit.families import family_for
from attnedit.families.hooks import watch
from attnedit.io import atomic_dir, content_sha256, write_text
from attnedit.recipe import parse_recipe
from attnedit.stages import stage2
from attnedit.surgery import edit_model
from attnedit.targets import AttnEditConfig


def test_saved_model_says_which_version_and_settings_made_it(tmp_path):
    student = edit_model(tiny_teacher("llama"), "gateswa", {"window": 8, "sink": 2})
    recipe = parse_recipe({"target": "gateswa", "target_args": {"window": 8, "sink": 2}})
    out = save_edited(student, tmp_path / "m", recipe=recipe)
    made = json.loads((out / "attnedit.json").read_text())
    assert made["attnedit_version"] == attnedit.__version__
    assert made["edit"]["settings"]["window"] == 8 and made["edit"]["settings"]["sink"] == 2
    assert made["recipe"]["target_args"]["window"] == 8 and made["recipe"]["stage2"]["steps"] == recipe.stage2.steps


def test_a_config_written_before_the_teacher_attention_rename_loads(tmp_path):
    student = edit_model(tiny_teacher("qwen3"), "mla", {})
    out = save_edited(student, tmp_path / "m")
    raw = json.loads((out / "config.json").read_text())
    raw["attention"] = raw.pop("teacher_attention")  # as older attnedit wrote it
    (out / "config.json").write_text(json.dumps(raw))
    config = AttnEditConfig.from_pretrained(out)
    assert config.teacher_attention == student.config.teacher_attention
    assert "attention" not in config.to_dict()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    teacher = tiny_teacher("qwen3")
    student = edit_model(teacher, "gateswa", {"window": 8, "full_layers": "none"})
    cfg = parse_recipe({"stage2": {"ce_weight": 0.1, "feature_weight": 0.5, "kl_chunk": 16}}).stage2
    params = [p for _, p in stage2.trainable(student, "attention")]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss_fn = stage2.make_loss(teacher, student, cfg)
    ids = tiny_ids(2, 24)
    results = []
    for on in (False, True):
        student.gradient_checkpointing, student.training = on, on  # as convert sets them
        loss, _ = loss_fn(ids)
        grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), grads))
    student.gradient_checkpointing, student.training = False, False
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_watch_reads_inputs_and_outputs_and_always_removes_its_hooks():
    teacher = tiny_teacher("llama")
    family = family_for(teacher.config)
    attn = {i: family.attention(teacher, i) for i in (0, 1)}
    seen_in, seen_out = {}, {}
    with torch.no_grad(), watch(attn, seen_in.__setitem__, seen_out.__setitem__):
        teacher(input_ids=tiny_ids(1, 8))
    assert sorted(seen_in) == sorted(seen_out) == [0, 1]
    assert seen_in[0].shape == seen_out[0].shape == (1, 8, teacher.config.hidden_size)

    def stop(i, y):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError), torch.no_grad(), watch(attn, on_output=stop):
        teacher(input_ids=tiny_ids(1, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in attn.values())


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path, monkeypatch):
    write_text(tmp_path / "a" / "x.txt", "one")
    assert (tmp_path / "a" / "x.txt").read_text() == "one"
    with pytest.raises(AttnEditError, match="could not write") as e, atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        raise OSError(28, "No space left on device")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder, no half-written d


def test_the_gguf_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    from attnedit.teachers.load import TeacherSource, _gguf_cache_dir

    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.gguf").write_bytes(b"same bytes")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "m.gguf").write_bytes(b"other bytes")
    dirs = [_gguf_cache_dir(TeacherSource(n, str(tmp_path / n), "m.gguf")) for n in ("a", "b", "c")]
    assert dirs[0] == dirs[1] != dirs[2]
    assert content_sha256(tmp_path / "a" / "m.gguf")[:16] in dirs[0].name


# the pipeline's layers, lowest first: a module imports its own layer or lower ones (function-level imports too)
LAYERS = ["base", "targets", "families", "teachers", "surgery", "data", "eval", "export", "report", "recipe", "distributed", "stages", "cli"]
ROOT_LAYERS = {"recipe": "recipe", "__main__": "cli"}  # attnedit/*.py not listed here are the base (errors, io, schema...)


def _imports() -> dict[str, set[str]]:
    """attnedit's modules (dotted, without the package; a package is its ``__init__``) -> the attnedit modules each
    imports, at module level or inside a function; ``from X import Y`` counts as importing ``X.Y`` where that is a
    module, else ``X``."""
    import ast
    from pathlib import Path

    root = Path(attnedit.__file__).parent
    names = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__"): f for f in root.rglob("*.py")}
    out = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("attnedit.")):
                if node.level:
                    base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                else:
                    base = node.module.split(".")[1:]
                targets = [".".join(base + [a.name]) for a in node.names]
                found |= {t if t in names else ".".join(base) for t in targets}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("attnedit.") for a in node.names if a.name.startswith("attnedit.")}
        out[name] = {f for f in found if f in names and f != name}
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the strongly connected
    components of more than one module, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return top if top in LAYERS else ROOT_LAYERS.get(top, "base")


def test_the_package_layers_import_downward_only():
    """No module imports a higher layer of the pipeline: e.g. the parallelism strategy (distributed/) never
    imports the stages it runs, and the recipe schema never imports the stages or the CLI."""
    upward = sorted(f"{a} -> {b}" for a, deps in _imports().items() for b in deps if LAYERS.index(_layer(b)) > LAYERS.index(_layer(a)))
    assert not upward, upward


def test_no_import_circle_between_modules():
    """No module imports itself through others, function-level imports included: e.g. the bench's engines and its
    capacity search, the attentions and the caches they share, the target registry and the targets it registers."""
    circles = _circles(_imports())
    assert not circles, circles
