"""attnedit report RUN RUN ... --out FILE.md: several run folders side by side, from their JSON only."""

import json
import shutil
from dataclasses import replace

import pytest
from test_cli_edit import attnedit
from tiny import tiny_teacher

from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.eval.kv import kv_figures
from attnedit.eval.quality import ratios
from attnedit.export import save_edited
from attnedit.recipe import parse_recipe
from attnedit.report.compare import (
    Accuracy,
    Figures,
    RunFigures,
    compare_runs,
    passkey_cells_held,
    passkey_grid_table,
    render_comparison,
    run_figures,
    varying,
    zero_shot_metric,
)
from attnedit.results import Passkey
from attnedit.stages.rundir import prepare_run_dir
from attnedit.surgery import edit_model

PASSKEY_TEACHER = [[1.0, 1.0, 1.0], [1.0, 0.75, 1.0]]  # means 1.00 and 0.92


def _eval_json(tasks: dict) -> dict:
    """eval.json as QualityRun.result writes it: student, teacher and their ratios per task."""
    return {
        "model": "run/model",
        "teacher": "tiny-teacher",
        "tasks": {t: {"student": s, "teacher": te, "ratio": ratios(s, te)} for t, (s, te) in tasks.items()},
        "limit": 100,
        "num_fewshot": None,
        "perplexity": {"max_length": 128, "stride": 64, "max_tokens": None, "contexts": [128, 256], "strides": [64, 128]},
        "device": "cpu",
        "dtype": "float32",
    }


def _ppl(ppl: float) -> dict:
    return {"ppl": ppl, "nll": 1.0, "tokens": 5000}


def _make_run(root, name, window, stage1_steps, kl, eval_json=None, passkey=None, model=True, stage1_memory=None):
    """A run folder as convert leaves it: recipe.yaml (the real writer), model/, summary.json (convert's layout
    with the real KV figures), and the given eval.json and passkey.json."""
    run = root / name
    raw = {
        "teacher": "tiny-teacher",
        "target": "gateswa",
        "target_args": {"window": window, "sink": 4, "full_layers": "every:2"},
        "data": {"files": ["corpus.jsonl"], "seq_len": 64},
        "stage1": {"steps": stage1_steps, "batch_size": 2},
        "stage2": {"steps": 10, "batch_size": 1, "seq_len": 128},
    }
    recipe = parse_recipe(raw)
    prepare_run_dir(recipe, run, resume=False)
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "gateswa", recipe.target_args)
    if model:
        save_edited(student, run / "model", recipe=recipe)
    summary = {"teacher": "tiny-teacher", "target": "gateswa", "edited_layers": [0, 1, 2, 3]}
    summary["heldout_before"] = {"kl": 1.0, "student_ce": 5.0, "teacher_ce": 4.0}
    if stage1_steps:
        summary["stage1"] = {"steps": stage1_steps, "tokens": stage1_steps * 2 * 64, "tok_s": 100.0}
        if stage1_memory:  # a GPU run's measured peak and the plan's estimate of it
            summary["stage1"].update(peak_memory_bytes=stage1_memory[0], est_memory_bytes=stage1_memory[1], ratio=0.4, wall_s=25.6)
    summary["stage2"] = {"steps": 10, "tokens": 10 * 128, "tok_s": 50.0}
    summary["heldout_after"] = {"kl": kl, "student_ce": 4.1, "teacher_ce": 4.0}
    summary["wall_s"] = 12.5
    summary["kv"] = kv_figures(student.config, teacher.config, "bfloat16")
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    if eval_json is not None:
        (run / "eval.json").write_text(json.dumps(eval_json))
    if passkey is not None:
        grid = {"contexts": [128, 256], "depths": [0.0, 0.5, 1.0], "trials": 4}
        (run / "passkey.json").write_text(json.dumps({"model": "m", "teacher_model": "tiny-teacher", **grid, **passkey}))
    return run, summary["kv"]["ratio"][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = _eval_json(
        {
            "wikitext2@128": (_ppl(22.0), _ppl(20.0)),
            "wikitext2@256": (_ppl(30.0), _ppl(24.0)),
            "arc_easy": (
                {"acc": 0.70, "acc_stderr": 0.04, "acc_norm": 0.50, "acc_norm_stderr": 0.05},
                {"acc": 0.72, "acc_stderr": 0.04, "acc_norm": 0.52, "acc_norm_stderr": 0.05},
            ),
            "winogrande": ({"acc": 0.60, "acc_stderr": 0.04}, {"acc": 0.64, "acc_stderr": 0.04}),
        }
    )
    b = _eval_json(
        {
            "wikitext2@128": (_ppl(21.0), _ppl(20.0)),
            "arc_easy": ({"acc": 0.69, "acc_norm": 0.51}, {"acc": 0.72, "acc_norm": 0.52}),
        }
    )
    b["perplexity"]["contexts"], b["perplexity"]["strides"] = [128], [64]
    made = {
        "gs-w16": _make_run(
            root, "gs-w16", 16, 20, 0.05, a, {"student": [[0.25, 0.5, 1.0], [0.0, 0.25, 1.0]], "teacher": PASSKEY_TEACHER}, stage1_memory=(4 * 2**30, 5 * 2**30)
        ),
        "gs-w32": _make_run(root, "gs-w32", 32, 20, 0.04, b, {"student": [[0.5, 0.5, 1.0], [0.25, 0.25, 1.0]], "teacher": PASSKEY_TEACHER}),
        "gs-s2only": _make_run(root, "gs-s2only", 16, 0, 0.2, model=False),
    }
    return root, {name: run for name, (run, _) in made.items()}, {name: r for name, (_, r) in made.items()}


def _table(text: str, first: str) -> list[dict]:
    """The Markdown table whose header starts with ``| first |``, as one dict per row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _compare(root, runs, out_name="cmp.md") -> str:
    out = root / out_name
    compare_runs([runs[n] for n in ("gs-w16", "gs-w32", "gs-s2only")], out)
    return out.read_text()


def test_runs_table(runs):
    root, dirs, kv_ratio = runs
    text = _compare(root, dirs)
    rows = {r["run"]: r for r in _table(text, "run")}
    assert list(rows) == ["gs-w16", "gs-w32", "gs-s2only", "teacher (tiny-teacher)"]
    a, b, c, t = rows["gs-w16"], rows["gs-w32"], rows["gs-s2only"], rows["teacher (tiny-teacher)"]
    # only the settings that differ (window, stage 1 steps), besides target and the tokens per stage
    settings = [h for h in a if h not in ("run", "held-out KL", "zero-shot acc % (Δ pts)") and not h.startswith(("KV", "ppl", "passkey"))]
    assert settings == ["target", "window", "stage1.steps", "stage1 tokens", "stage2 tokens"]
    assert (a["window"], b["window"], c["window"], t["window"]) == ("16", "32", "16", "-")
    assert (a["stage1.steps"], c["stage1.steps"]) == ("20", "0")
    assert (a["stage1 tokens"], a["stage2 tokens"], c["stage1 tokens"]) == ("2.56k", "1.28k", "0")  # stage 1 skipped: 0
    # KV at the largest context of the KV figures (the tiny teacher's 512), from summary.json
    kv = "KV % of T @512"
    assert a[kv] == f"{100 * kv_ratio['gs-w16']:.1f}%" and b[kv] == f"{100 * kv_ratio['gs-w32']:.1f}%"
    assert kv_ratio["gs-w16"] < kv_ratio["gs-w32"] < 1 and t[kv] == "100.0%"
    assert (a["held-out KL"], c["held-out KL"], t["held-out KL"]) == ("0.05", "0.2", "0")
    # perplexity per window, change vs the teacher in %; a window a run lacks is '-'
    assert (a["ppl @128 (Δ%)"], b["ppl @128 (Δ%)"], t["ppl @128 (Δ%)"]) == ("22 (+10.0%)", "21 (+5.0%)", "20")
    assert (a["ppl @256 (Δ%)"], b["ppl @256 (Δ%)"], t["ppl @256 (Δ%)"]) == ("30 (+25.0%)", "-", "24")
    # mean of acc_norm (arc_easy) and acc (winogrande): (0.50 + 0.60) / 2 vs the teacher's (0.52 + 0.64) / 2
    zs = "zero-shot acc % (Δ pts)"
    assert (a[zs], t[zs]) == ("55.0 (-3.0)", "58.0")
    assert b[zs] == "51.0 (-1.0) [1 of 2 tasks]"  # its teacher's arc_easy acc_norm is 0.52
    # passkey: mean over depths per context
    assert (a["passkey @128"], a["passkey @256"], b["passkey @128"]) == ("0.58", "0.42", "0.67")
    assert (t["passkey @128"], t["passkey @256"]) == ("1.00", "0.92")
    for col in ("ppl @128 (Δ%)", zs, "passkey @128"):  # run 3 has no eval.json, no passkey.json
        assert c[col] == "-", col
    assert "- gs-s2only: no eval.json, passkey.json" in text
    assert "acc_norm where the task reports it, else acc" in text  # the rule is in the document


def test_training_table_shows_speed_and_the_plan_next_to_the_measured_peak(runs):
    """A row per run and stage that trained; the plan's error is plan / peak - 1, '-' where a run has no peak."""
    root, dirs, _ = runs
    text = _compare(root, dirs, "cmp-training.md")
    rows = [(r["run"], r["stage"]) for r in _table(text, "run | stage")]
    assert rows == [("gs-w16", "1"), ("gs-w16", "2"), ("gs-w32", "1"), ("gs-w32", "2"), ("gs-s2only", "2")]  # stage 1 skipped
    first = _table(text, "run | stage")[0]
    assert first == {
        "run": "gs-w16", "stage": "1", "tokens": "2.56k", "time": "26 s", "tok/s": "100", "x T fwd": "0.40x", "peak": "4.0 GiB",
        "plan": "5.0 GiB", "plan vs peak": "+25%",
    }  # fmt: skip
    second = _table(text, "run | stage")[1]
    assert (second["tok/s"], second["peak"], second["plan"], second["plan vs peak"]) == ("50", "-", "-", "-")
    assert "positive where the plan errs high" in text


def test_zero_shot_and_passkey_tables(runs):
    root, dirs, _ = runs
    text = _compare(root, dirs, "cmp2.md")
    tasks = {r["task"]: r for r in _table(text, "task")}
    assert list(tasks) == ["arc_easy", "winogrande", "mean"]
    assert tasks["arc_easy"] == {
        "task": "arc_easy", "metric": "acc_norm", "teacher": "52.0 ± 5.0", "gs-w16": "50.0 ± 5.0", "gs-w32": "51.0",
        "gs-s2only": "-",
    }  # fmt: skip
    assert tasks["winogrande"]["metric"] == "acc" and tasks["winogrande"]["gs-w32"] == "-"
    assert (tasks["mean"]["teacher"], tasks["mean"]["gs-w16"], tasks["mean"]["gs-w32"]) == ("58.0", "55.0", "51.0 [1 of 2]")
    grid = _table(text, "model")
    assert [(r["model"], r["context"]) for r in grid] == [
        ("teacher", "128"), ("teacher", "256"), ("gs-w16", "128"), ("gs-w16", "256"), ("gs-w32", "128"), ("gs-w32", "256")
    ]  # fmt: skip
    assert [grid[3][f"depth {d}"] for d in ("0", "0.5", "1")] == ["0.00", "0.25", "1.00"]
    assert grid[1]["depth 0.5"] == "0.75" and grid[0]["keys"] == "4"
    assert "No passkey.json: gs-s2only." in text


def test_only_differing_settings_and_teacher_notes():
    base = RunFigures("a", "a", settings={"target": "mla", "target_args.kv_lora_rank": 64, "stage2.trainable": "attention"})
    other = replace(base, run="b", path="b", settings={**base.settings, "target_args.kv_lora_rank": 128, "target_args.init": "teacher"})
    assert varying([base, other], ["target", "target_args.kv_lora_rank", "target_args.init", "stage2.trainable"]) == [
        "target_args.kv_lora_rank", "target_args.init"
    ]  # fmt: skip
    assert zero_shot_metric({"acc": 0.5, "acc_norm": 0.4}) == "acc_norm" and zero_shot_metric({"acc": 0.5}) == "acc"
    # b's teacher was measured differently: its change is against its own teacher figure, with a note
    a = replace(base, student=Figures(ppl={2048: 22.0}), teacher=Figures(ppl={2048: 20.0}))
    b = replace(other, student=Figures(ppl={2048: 22.0}), teacher=Figures(ppl={2048: 22.0}))
    text = render_comparison([a, b])
    rows = {r["run"]: r for r in _table(text, "run")}
    assert rows["a"]["ppl @2048 (Δ%)"] == "22 (+10.0%)" and rows["b"]["ppl @2048 (Δ%)"] == "22 (+0.0%)"
    assert "- b: its own teacher figures differ from the teacher row's (ppl@2048" in text
    assert list(rows["a"])[:4] == ["run", "target", "kv_lora_rank", "init"]
    # two folders of one name are told apart by their paths
    text = render_comparison([replace(base, path="x/run", run="run"), replace(base, path="y/run", run="run")])
    assert [r["run"] for r in _table(text, "run")][:2] == ["x/run", "y/run"]


def test_figures_come_from_the_files_alone(runs):
    _, dirs, _ = runs
    fig = run_figures(dirs["gs-s2only"])  # no model/, no eval.json, no passkey.json
    assert fig.settings["target"] == "gateswa" and fig.tokens[1] == 0 and fig.settings["stage2.seq_len"] == 128
    assert fig.student == Figures() and fig.teacher == Figures() and fig.passkey is None
    assert fig.missing == ["eval.json", "passkey.json"]


def test_cli_compare_and_json(runs, tmp_path, capsys):
    _, dirs, _ = runs
    out = tmp_path / "sub" / "ablation.md"
    code, stdout, _ = attnedit(capsys, "report", dirs["gs-w16"], dirs["gs-w32"], "--out", out, "--json")
    assert code == 0 and json.loads(stdout) == {"report": str(out), "files": [str(out)]}
    assert "| gs-w32 |" in out.read_text()
    code, out_text, _ = attnedit(capsys, "report", "--help")
    text = " ".join(out_text.split())
    assert code == 0 and "--compare" in text and "--out FILE.md" in text and "acc_norm where a task reports it" in text


def test_one_run_still_writes_its_report(runs, tmp_path, capsys):
    _, dirs, _ = runs
    run = tmp_path / "gs-w16"
    shutil.copytree(dirs["gs-w16"], run)
    assert main(["report", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(run / "report.md")
    assert (run / "report.md").read_text().startswith("# attnedit report: gs-w16")
    (run / "report.md").unlink()
    assert main(["report", str(run), "--compare", "--out", str(tmp_path / "one.md")]) == 0  # one run, compared
    assert not (run / "report.md").exists() and "| gs-w16 |" in (tmp_path / "one.md").read_text()


def _bad_run(tmp_path, name: str, content: str):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"target": "mla"}))
    (run / name).write_text(content)
    return run


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("eval.json", "{not json", "eval.json is not valid JSON"),
        ("eval.json", json.dumps({"tasks": {"arc_easy": [0.5]}}), "eval.json does not have the layout attnedit writes"),
        ("passkey.json", json.dumps({"contexts": [64], "depths": [0, 1], "trials": 1, "student": [[1.0]]}),
         "passkey.json does not have the layout attnedit writes"),
        ("bench.json", json.dumps({"runs": []}), "bench.json lacks kv"),
        ("recipe.yaml", "target: [mla\n", "recipe.yaml is not valid YAML"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_file(runs, tmp_path, capsys, name, content, message):
    _, dirs, _ = runs
    bad = _bad_run(tmp_path, name, content)
    with pytest.raises(AttnEditError, match=message):
        compare_runs([dirs["gs-w16"], bad], tmp_path / "x.md")
    code, _, err = attnedit(capsys, "report", dirs["gs-w16"], bad, "--out", tmp_path / "x.md")
    assert code == 2 and err.startswith(f"attnedit: error: {bad / name}") and err.count("\n") == 1
    assert not (tmp_path / "x.md").exists()


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    _, dirs, _ = runs
    a, b = dirs["gs-w16"], dirs["gs-w32"]
    (tmp_path / "empty").mkdir()
    cases = [
        (["report", a, tmp_path / "absent", "--out", tmp_path / "x.md"], f"{tmp_path / 'absent'} is not a folder"),
        (["report", a, tmp_path / "empty", "--out", tmp_path / "x.md"], f"{tmp_path / 'empty'} holds none of"),
        (["report", a, b], "give it with --out FILE.md"),
        (["report", a, "--compare"], "give it with --out FILE.md"),
        (["report", a, "--out", tmp_path / "x.md"], "--out is for comparisons"),
        (["report", a, b, "--out", tmp_path], "is a folder; give the comparison's file name"),
    ]
    for args, message in cases:
        code, _, err = attnedit(capsys, *args)
        assert code == 2 and err.startswith("attnedit: error: ") and err.count("\n") == 1, args
        assert message in err, (args, err)


def test_the_passkey_grid_says_how_each_run_drew_its_keys():
    """Runs measured with different protocols (5 keys on one filler, 20 each on its own) are told apart."""

    def run(name, trials, teacher, filler=None):  # as run_figures reads a passkey.json (older ones have no filler)
        pk = {"contexts": [64], "depths": [0.0], "trials": trials, "student": [[1.0]], "teacher": [[teacher]]}
        return RunFigures(name, name, passkey=Passkey.parse({**pk, **({"filler": filler} if filler else {})}, "passkey.json"))

    a, b, c = run("a", 5, 1.0), run("b", 20, 0.5, "varied"), run("c", 20, 0.0, "varied")
    rows = [line.split("|")[1:5] for line in passkey_grid_table([a, b, c]).splitlines()[2:]]
    varied = "20, each with its own shuffled filler"
    assert [[cell.strip() for cell in r] for r in rows] == [
        ["teacher", "64", "5", "1.00"], ["teacher", "64", varied, "0.50"],  # one teacher row per protocol, its first run's
        ["a", "64", "5", "1.00"], ["b", "64", varied, "1.00"], ["c", "64", varied, "1.00"],
    ]  # fmt: skip


def _passkey(student: list[list[float]], teacher: list[list[float]]) -> Passkey:
    return Passkey.model_validate(
        {"model": "m", "teacher_model": "t", "contexts": [128], "depths": [0.0, 1.0], "trials": 4, "student": student, "teacher": teacher}
    )


def test_runs_of_two_teachers_are_each_compared_with_their_own():
    """A comparison across teachers (SmolLM2 and Qwen2.5 runs side by side): one teacher row, zero-shot column and
    passkey grid per teacher; a run without its own teacher figures is compared with its teacher's row, never with
    another teacher's; one GGUF named by two folders is one teacher."""
    acc = lambda v: Accuracy(v, None, "acc_norm")  # noqa: E731
    small = RunFigures("small", "small", teacher_model="tiny-a", student=Figures(ppl={128: 22.0}, accuracy={"piqa": acc(0.50)}),
                       teacher=Figures(ppl={128: 20.0}, accuracy={"piqa": acc(0.60)}),
                       passkey=_passkey([[1.0, 0.5]], [[1.0, 1.0]]))  # fmt: skip
    big = RunFigures("big", "big", teacher_model="/data/one/b.gguf", student=Figures(ppl={128: 33.0}, accuracy={"piqa": acc(0.70)}),
                     teacher=Figures(ppl={128: 30.0}, accuracy={"piqa": acc(0.75)}),
                     passkey=_passkey([[0.5, 0.5]], [[0.75, 1.0]]))  # fmt: skip
    big2 = RunFigures("big-eval-only", "big2", teacher_model="/elsewhere/b.gguf", student=Figures(ppl={128: 36.0}))  # no teacher figures
    text = render_comparison([small, big, big2])
    rows = {r["run"]: r for r in _table(text, "run")}
    assert list(rows) == ["small", "big", "big-eval-only", "teacher (tiny-a)", "teacher (b.gguf)"]
    assert rows["small"]["ppl @128 (Δ%)"] == "22 (+10.0%)" and rows["big"]["ppl @128 (Δ%)"] == "33 (+10.0%)"
    assert rows["big-eval-only"]["ppl @128 (Δ%)"] == "36 (+20.0%)"  # against b.gguf's 30, not tiny-a's 20
    assert (rows["teacher (tiny-a)"]["ppl @128 (Δ%)"], rows["teacher (b.gguf)"]["ppl @128 (Δ%)"]) == ("20", "30")
    assert rows["big"]["zero-shot acc % (Δ pts)"] == "70.0 (-5.0)" and "its own teacher figures differ" not in text
    tasks = {r["task"]: r for r in _table(text, "task")}
    assert tasks["piqa"] == {"task": "piqa", "metric": "acc_norm", "teacher (tiny-a)": "60.0", "teacher (b.gguf)": "75.0",
                             "small": "50.0", "big": "70.0", "big-eval-only": "-"}  # fmt: skip
    grid = [(r["model"], r["depth 0"]) for r in _table(text, "model")]
    assert grid == [("teacher (tiny-a)", "1.00"), ("teacher (b.gguf)", "0.75"), ("small", "1.00"), ("big", "0.50")]


def test_passkey_cells_held_count_the_cells_within_five_points_of_the_teacher():
    """The issue-style passkey target ("within 5 points in 13 of 15 cells") as a column: a cell holds where the
    student is at most 5 points below the teacher on the same keys (exactly 5 below holds, 6 does not; above the
    teacher holds); a run without its own teacher grid, and the teacher's row, show '-'."""
    assert passkey_cells_held(_passkey([[0.95, 0.94]], [[1.0, 1.0]])) == (1, 2)
    assert passkey_cells_held(_passkey([[0.80, 0.00]], [[0.70, 0.00]])) == (2, 2)
    assert passkey_cells_held(_passkey([[0.5, 0.5]], [[0.75, 1.0]])) == (0, 2)
    assert passkey_cells_held(Passkey.model_validate({"contexts": [128], "depths": [0.0], "trials": 1, "student": [[1.0]]})) is None
    assert passkey_cells_held(None) is None
    held = _passkey([[1.0, 0.96]], [[1.0, 1.0]])
    text = render_comparison([RunFigures("a", "a", teacher_model="t", passkey=held, student=Figures(passkey={128: 0.98})),
                              RunFigures("b", "b", teacher_model="t", passkey=_passkey([[0.2, 1.0]], [[1.0, 1.0]])),
                              RunFigures("c", "c", teacher_model="t", student=Figures(ppl={128: 20.0}))])  # fmt: skip
    rows = {r["run"]: r["passkey cells within 5 pts"] for r in _table(text, "run")}
    assert rows == {"a": "2 of 2", "b": "1 of 2", "c": "-", "teacher (t)": "-"}
    assert "passkey cells within 5 pts: the (context, depth) cells" in text
    # no run with a passkey grid of its teacher: no column
    text = render_comparison([RunFigures("c", "c", teacher_model="t", student=Figures(ppl={128: 20.0}))])
    assert "passkey cells" not in text


def test_a_stopped_evaluation_shows_the_pieces_it_finished(tmp_path):
    """A run whose evaluation was stopped (a time limit, a signal) has no eval.json, only the pieces it kept in
    eval.progress.json to resume from (written here by the evaluation's own writer): the comparison shows those
    figures, says where they came from, and does not call eval.json missing; a progress file of another layout is a
    one-line error."""
    from attnedit.eval.progress import Progress

    run, _ = _make_run(tmp_path, "stopped", 16, 20, 0.05, passkey=None)
    progress = Progress(run / "eval.progress.json", {"model": str(run / "model"), "teacher": "tiny-teacher", "ppl_context": [128, 256]})
    for who, ppl in (("student", 22.0), ("teacher", 20.0)):
        progress.put(who, "wikitext2@128", _ppl(ppl))
    progress.put("student", "wikitext2@256", _ppl(30.0))  # stopped before the teacher's 256 window
    fig = run_figures(run)
    assert fig.stopped_pieces == 3 and fig.student.ppl == {128: 22.0, 256: 30.0} and fig.teacher.ppl == {128: 20.0}
    assert fig.missing == ["passkey.json"]
    text = render_comparison([fig])
    row = next(r for r in _table(text, "run") if r["run"] == "stopped")
    assert (row["ppl @128 (Δ%)"], row["ppl @256 (Δ%)"]) == ("22 (+10.0%)", "30")
    assert "- stopped: its evaluation was stopped before it wrote eval.json; its quality figures are the 3 pieces" in text
    assert "no eval.json" not in text
    # one window: its piece is named wikitext2, and the window comes from the progress key
    Progress(run / "eval.progress.json", {"ppl_context": [512]}).put("student", "wikitext2", _ppl(25.0))
    assert run_figures(run).student.ppl == {512: 25.0}
    (run / "eval.progress.json").write_text(json.dumps({"key": {}, "pieces": []}))
    with pytest.raises(AttnEditError, match="eval.progress.json does not have the layout attnedit writes"):
        run_figures(run)


def test_a_stopped_training_says_where_it_stopped_and_how_to_go_on(tmp_path):
    """A run stopped in training (a signal, a time limit) has no summary.json; the comparison says after which step
    it stopped, from the last step metrics.jsonl logged (written here by the trainer's own log) and the recipe's steps,
    and gives the command that resumes it when the folder keeps a checkpoint; a finished run gets no such note."""
    from attnedit.distributed.checkpoint import checkpoint_path
    from attnedit.stages.trainer import MetricsLog

    run, _ = _make_run(tmp_path, "stopped", 16, 20, 0.05, model=False)
    assert run_figures(run).stopped_training is None  # finished: summary.json is there
    (run / "summary.json").unlink()
    log = MetricsLog(run)
    for step in (10, 20):
        log.write({"stage": 1, "step": step, "tokens": step * 128, "loss": 0.5})
    log.write({"stage": 2, "step": 5, "tokens": 640, "loss": 0.1, "kl": 0.1})
    log.write({"stage": 2, "event": "SIGTERM"})  # events carry no step
    fig = run_figures(run)
    assert fig.stopped_training.startswith("its training stopped after stage 2, step 5 of 10 (the last step metrics.jsonl logged)")
    assert fig.stopped_training.endswith("the folder keeps no checkpoint (checkpoints/)")
    saved = checkpoint_path(run, 2, 5)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.with_name(saved.name + ".sha256").write_text("0" * 64)  # a sidecar whose checkpoint was never renamed in
    (saved.parent / "stage2-step000005.dcp").mkdir()  # a sharded checkpoint without the meta.pt rank 0 writes last
    assert run_figures(run).stopped_training.endswith("the folder keeps no checkpoint (checkpoints/)")
    saved.write_bytes(b"")
    text = render_comparison([run_figures(run)])
    assert (
        f"- stopped: its training stopped after stage 2, step 5 of 10 (the last step metrics.jsonl logged); `attnedit convert {run} --resume` continues it"
        in text
    )
    (run / "metrics.jsonl").write_text("")  # stopped before its first logged step: nothing to say
    assert run_figures(run).stopped_training is None
    (run / "metrics.jsonl").write_text('{"stage": 2, "step": 5, "loss": 0.1}\n{"stage": 2, "st')
    with pytest.raises(AttnEditError, match=r"metrics.jsonl line 2 is not valid JSON"):
        run_figures(run)
