"""``attnedit convert`` runs the recipe's ``eval:`` section once the model is saved: eval.json, passkey.json,
bench.json and report.md in the run folder, the student-vs-teacher tables at the end of its output, the missing
parts only on ``--resume``, and one-line errors for bad eval settings before any training."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from test_stages import WORDS, make_docs, make_teacher_dir, tiny_raw

from attnedit.cli import main
from attnedit.recipe import EvalConfig, PasskeyConfig, load_recipe
from attnedit.stages.evaluate import describe

PARTS = ("eval.json", "passkey.json", "bench.json")
REPO = Path(__file__).resolve().parents[1]


def wikitext(root: Path) -> Path:
    """A data folder with a small WikiText-2-shaped test file (titles, paragraphs, blank lines)."""
    r = random.Random(0)
    lines = []
    for n in range(6):
        lines += [" \n", f" = article {n} = \n", " \n"]
        lines += [" " + " ".join(r.choice(WORDS) for _ in range(40)) + " . \n" for _ in range(3)]
    path = root / "data" / "wikitext-2-raw" / "wiki.test.raw"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return root / "data"


EVAL = {
    "tasks": ["wikitext2"],
    "ppl_context": [32, 64],
    "ppl_tokens": 200,
    "passkey": {"contexts": [240], "depths": [0.0, 1.0], "trials": 2},
    "bench": {"contexts": [16], "batches": [1], "decode_tokens": 2, "repeats": 1, "warmup": 0, "stock": False},
}


def write_recipe(path: Path, assets: Path, **over) -> Path:
    """A few-second tiny recipe (teacher and documents from ``assets``) at ``path``."""
    over = {"stage1__steps": 2, "stage2__steps": 2, **over}
    path.write_text(yaml.safe_dump(tiny_raw(make_teacher_dir(assets), assets / "docs.jsonl", **over)))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-eval-assets")
    make_teacher_dir(root)
    make_docs(root / "docs.jsonl")
    return root


@pytest.fixture(scope="module")
def finished(assets):
    """One converted run with every eval part, and what convert printed."""
    root = assets
    recipe = write_recipe(root / "recipe.yaml", assets, eval={**EVAL, "data_dir": str(wikitext(root))})
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["convert", str(recipe), "--out", str(root / "run"), "--progress", "none"]) == 0
    return root, root / "run", printed.getvalue()


def test_convert_writes_the_eval_files_the_report_and_prints_the_table(finished, capsys):
    root, run, printed = finished
    for name in (*PARTS, "report.md", "kv_vs_context.png", "passkey.png", "speed_vs_batch.png"):
        assert (run / name).is_file(), name
    quality = json.loads((run / "eval.json").read_text())
    teacher = str(root / "teacher-llama")
    assert (quality["model"], quality["teacher"]) == (str(run / "model"), teacher)
    assert list(quality["tasks"]) == ["wikitext2@32", "wikitext2@64"]
    assert quality["perplexity"]["contexts"] == [32, 64] and quality["perplexity"]["strides"] == [16, 32]
    for task in quality["tasks"].values():
        assert task["student"]["tokens"] == task["teacher"]["tokens"] == 199
        assert task["ratio"]["ppl"] == pytest.approx(task["student"]["ppl"] / task["teacher"]["ppl"])
    passkey = json.loads((run / "passkey.json").read_text())
    assert (passkey["contexts"], passkey["depths"], passkey["trials"]) == ([240], [0.0, 1.0], 2)
    assert len(passkey["student"]) == len(passkey["teacher"]) == 1 and passkey["teacher_model"] == teacher
    bench = json.loads((run / "bench.json").read_text())
    assert [(r["batch"], r["context"]) for r in bench["runs"]] == [(1, 16)] and bench["decode_tokens"] == 2
    assert bench["runs"][0]["teacher_stock"] is None  # stock: false
    report = (run / "report.md").read_text()
    assert "| wikitext2@64 | ppl |" in report and "![passkey accuracy](passkey.png)" in report and "No efficiency" not in report
    # the printed table ends convert's output: every perplexity row with student, teacher and their ratio
    tail = printed[printed.index("student vs teacher") :]
    for task, t in quality["tasks"].items():
        row = next(line.split() for line in tail.splitlines() if line.startswith(f"{task} ") and " ppl " in line)
        assert row[2:] == [f"{t['student']['ppl']:.4f}", f"{t['teacher']['ppl']:.4f}", f"{t['ratio']['ppl']:.4f}"]
    assert "passkey retrieval" in tail and f"report: {run / 'report.md'}" in tail
    # the same figures as `attnedit eval` with the same settings (one code path)
    args = ["eval", str(run / "model"), "--teacher", teacher, "--tasks", "wikitext2", "--ppl-context", "32,64",
            "--ppl-tokens", "200", "--data-dir", str(root / "data"), "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == quality["tasks"]


def test_the_model_card_shows_the_conversion_and_the_evaluation_next_to_the_teacher(finished, tmp_path, capsys):
    from attnedit.eval.quality import quality_rows

    _, run, _ = finished
    card = (run / "model" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n") and "attention-mla" in card
    assert "## Conversion" in card and "- Stage 1, layer-wise teacher forcing (each new attention on the teacher's own inputs): 2 steps" in card
    assert "### Held-out text" in card and f"| {summary['heldout_after']['kl']:,.4g} |" in card
    for row in quality_rows(json.loads((run / "eval.json").read_text())):  # every figure of eval.json, teacher beside
        assert "| " + " | ".join(row) + " |" in card
    assert "### Passkey retrieval" in card and "| teacher | 240 |" in card
    # attnedit export carries it, saying what the export is
    assert main(["export", str(run / "model"), "--format", "stock", "--no-check", "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    exported = (tmp_path / "ds" / "README.md").read_text()
    assert "## This export" in exported and "- format-deepseek_v3" in exported
    assert exported.split("## This export")[1].split("## Conversion")[1] == card.split("## Conversion")[1]


def test_resume_after_the_model_is_saved_makes_only_the_missing_parts(finished, tmp_path, monkeypatch, capsys):
    from attnedit.eval import bench, passkey, quality

    convert_module = importlib.import_module("attnedit.stages.convert")  # the package exports the function

    _, done, _ = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    before = {name: (run / name).read_bytes() for name in (*PARTS, "metrics.jsonl", "summary.json", "model/model.safetensors")}
    calls = []
    for module, name in ((quality.QualityRun, "result"), (passkey, "passkey_json"), (bench, "run_bench")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    monkeypatch.setattr(convert_module, "train_and_save", lambda *a, **k: pytest.fail("resume trained again"))

    (run / "eval.json").unlink()
    (run / "report.md").unlink()
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0
    out, err = capsys.readouterr()
    assert calls == ["result"]
    assert "has already finished" in err and "evaluating what is missing: eval.json" in err
    redone = json.loads((run / "eval.json").read_text())
    assert redone["tasks"] == json.loads(before["eval.json"])["tasks"]  # same model, same data: the same figures
    assert redone["model"] == str(run / "model")
    for name in ("passkey.json", "bench.json", "metrics.jsonl", "summary.json", "model/model.safetensors"):
        assert (run / name).read_bytes() == before[name], name
    assert (run / "report.md").is_file() and "student vs teacher" in out

    # an evaluation that stopped during the passkey part (here: a failure) keeps what it finished
    calls.clear()
    for name in ("passkey.json", "bench.json"):
        (run / name).unlink()
    counted = passkey.passkey_json
    monkeypatch.setattr(passkey, "passkey_json", lambda *a, **k: (_ for _ in ()).throw(passkey.AttnEditError("out of keys")))
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("attnedit: error: out of keys (evaluation after training") and "--resume" in err
    assert not (run / "passkey.json").exists() and not (run / "bench.json").exists() and calls == []
    assert not list(run.glob(".*.tmp-*"))
    monkeypatch.setattr(passkey, "passkey_json", counted)
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0
    assert calls == ["passkey_json", "run_bench"]
    assert json.loads((run / "passkey.json").read_text())["student"] == json.loads(before["passkey.json"])["student"]
    assert json.loads((run / "eval.json").read_text()) == redone

    # everything there: nothing runs, the tables are printed again
    calls.clear()
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0
    assert calls == [] and "student vs teacher" in capsys.readouterr().out


def test_an_empty_eval_section_changes_nothing(assets, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "plain.yaml", assets, eval={}, stage1__steps=1, stage2__steps=1)
    assert main(["convert", str(recipe), "--out", str(tmp_path / "run"), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "student vs teacher" not in out and "model saved to" in out.splitlines()[-1]
    assert not any((tmp_path / "run" / name).exists() for name in (*PARTS, "report.md"))
    assert load_recipe(tmp_path / "run" / "recipe.yaml").eval.parts() == []
    assert main(["convert", str(recipe), "--dry-run"]) == 0
    assert "evaluation       none" in capsys.readouterr().out


@pytest.mark.parametrize(
    "sets,message",
    [
        (["eval.tasks=wikitext2", "eval.data_dir={tmp}"], "eval.tasks has wikitext2, which reads {tmp}/wikitext-2-raw/wiki.test.raw; that file does not exist"),
        (["eval.tasks=piqa", "eval.data_dir={tmp}"], "eval.tasks has piqa, which reads {tmp}/fewshot/"),
        (["eval.passkey.contexts=256,100000"], "eval.passkey.contexts: 100000 is longer than the teacher supports (512 tokens)"),
        (["eval.ppl_context=64", "eval.ppl_stride=128"], "eval.ppl_stride=128: must not exceed the perplexity window"),
        (["eval.bench.contexts=64", "eval.bench.decode_tokens=0"], "eval.bench.decode_tokens=0: must be at least 1"),
    ],
)
def test_bad_eval_settings_fail_in_one_line_before_training(assets, tmp_path, capsys, sets, message):
    recipe = write_recipe(tmp_path / "bad.yaml", assets)
    args = [a for s in sets for a in ("--set", s.format(tmp=tmp_path))]
    assert main(["convert", str(recipe), "--out", str(tmp_path / "run"), *args, "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnedit: error: ") and "\n" not in err
    assert message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists()


def test_dry_run_plans_the_evaluation(finished, capsys):
    root, run, _ = finished
    assert main(["convert", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "evaluation       eval.json: wikitext2 perplexity at 32 (stride 16), 64 (stride 32) (first 200 tokens of WikiText-2)" in out
    assert "passkey.json: contexts 240 x depths 0,1, 2 trials\n" in out and "bench.json: batches 1 x contexts 16" in out


def test_the_plan_says_when_each_passkey_trial_has_its_own_filler():
    cfg = EvalConfig(passkey=PasskeyConfig(contexts=[240], depths=[0.0], trials=20, filler="varied"))
    assert describe(cfg) == ["passkey.json: contexts 240 x depths 0, 20 trials, each with its own shuffled filler"]


def test_the_shipped_recipes_evaluate():
    """The GPU recipes measure what the project's results need; the CPU ones a small sample of it."""
    for name in ("smollm2-mla.yaml", "smollm2-mla-2k.yaml", "smollm2-gateswa.yaml", "smollm2-swa-stock.yaml"):
        e = load_recipe(REPO / "recipes" / name).eval
        assert e.tasks == ["wikitext2", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"], name
        assert (e.ppl_context, e.limit, e.num_fewshot) == ([2048, 8192], None, None), name
        assert e.passkey.contexts == [2048, 4096, 8192], name
        assert (e.bench.contexts, e.bench.batches) == ([2048, 8192], [1, 64]), name
    # the shipped MLA headline's passkey: 20 keys a cell, each with its own filler (docs/results.md)
    shipped = load_recipe(REPO / "recipes" / "smollm2-mla.yaml").eval.passkey
    assert (shipped.trials, shipped.filler) == (20, "varied")
    for name in ("smollm2-mla-cpu.yaml", "smollm2-gateswa-cpu.yaml"):
        e = load_recipe(REPO / "recipes" / name).eval
        assert "wikitext2" in e.tasks and e.ppl_tokens and e.ppl_tokens <= 8192, name
        assert e.passkey.contexts and max(e.passkey.contexts) <= 512 and not e.bench.contexts, name
        assert e.limit is not None or e.tasks == ["wikitext2"], name


def test_an_evaluation_stopped_in_its_last_part_keeps_every_finished_figure(finished, tmp_path, monkeypatch, capsys):
    """The short parts run first (perplexity, passkey, bench), the few-shot tasks last; a stop during the tasks (here:
    a failure) keeps the perplexity of both models in eval.progress.json and the passkey and bench files, and the
    resume measures no perplexity again; a progress file of other weights is not used."""
    from attnedit.eval import quality

    _, done, _ = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    want = json.loads((run / "eval.json").read_text())
    for name in (*PARTS, "report.md"):
        (run / name).unlink()
    monkeypatch.setattr(quality.QualityRun, "fewshot", lambda self: (_ for _ in ()).throw(quality.AttnEditError("stopped")))
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 2
    capsys.readouterr()
    kept = json.loads((run / "eval.progress.json").read_text())
    assert set(kept["pieces"]["student"]) == set(kept["pieces"]["teacher"]) == {"wikitext2@32", "wikitext2@64"}
    assert kept["pieces"]["student"]["wikitext2@64"] == want["tasks"]["wikitext2@64"]["student"]
    assert (run / "passkey.json").is_file() and (run / "bench.json").is_file() and not (run / "eval.json").exists()

    monkeypatch.undo()
    measured = []
    real = quality.perplexity
    monkeypatch.setattr(quality, "perplexity", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main(["convert", str(run), "--resume", "--progress", "lines"]) == 0
    assert "4 quality figures kept from the stopped evaluation (eval.progress.json)" in capsys.readouterr().err
    assert measured == [] and json.loads((run / "eval.json").read_text())["tasks"] == want["tasks"]
    assert not (run / "eval.progress.json").exists()

    # a progress file whose weights are not the model's (retrained, copied over) is measured again
    (run / "eval.json").unlink()
    kept["key"]["model_files"][0][1] += 1
    kept["pieces"]["student"]["wikitext2@32"]["ppl"] = 1.0  # would show if it were used
    (run / "eval.progress.json").write_text(json.dumps(kept))
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0
    assert len(measured) == 4 and json.loads((run / "eval.json").read_text())["tasks"] == want["tasks"]


def test_a_stopped_passkey_part_keeps_its_finished_rows(finished, tmp_path, monkeypatch):
    """Each model's passkey row at a context is kept in passkey.progress.json as soon as it is done: after a stop
    (Ctrl-C during the teacher's row) the resume measures the teacher's row alone and writes the same grid."""
    from attnedit.eval import passkey

    _, done, _ = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    want = json.loads((run / "passkey.json").read_text())
    (run / "passkey.json").unlink()
    (run / "bench.json").unlink()
    real, calls = passkey.passkey_accuracy, []
    per_row = len(want["depths"])

    def stop_in_the_teachers_row(*a, **k):
        calls.append(1)
        if len(calls) > per_row:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(passkey, "passkey_accuracy", stop_in_the_teachers_row)
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 130
    kept = json.loads((run / "passkey.progress.json").read_text())["pieces"]
    assert kept == {"student": {"240": want["student"][0]}} and not (run / "passkey.json").exists()

    calls.clear()
    monkeypatch.setattr(passkey, "passkey_accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0
    assert len(calls) == per_row  # the teacher's row alone
    redone = json.loads((run / "passkey.json").read_text())
    assert (redone["student"], redone["teacher"]) == (want["student"], want["teacher"]) and not (run / "passkey.progress.json").exists()
