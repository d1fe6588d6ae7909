"""attnedit report: report.md and PNGs from a synthetic run folder; missing inputs; bad inputs."""

import json
import math
from pathlib import Path

import pytest
from tiny import tiny_teacher

from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.eval.bench import BenchSettings, run_bench
from attnedit.export import save_edited
from attnedit.report import build_report
from attnedit.surgery import edit_model

PNGS = ("loss_curves.png", "kv_vs_context.png", "speed_vs_batch.png", "passkey.png")

ROOT = Path(__file__).resolve().parents[1]


def _metrics() -> str:
    """Lines as the trainer writes them: stage 1 with per-layer figures, stage 2 with its loss terms, an event."""
    lines = []
    for step in range(40):
        loss = math.exp(-step / 10)
        lines.append(
            {
                "stage": 1,
                "step": step,
                "tokens": 4096 * (step + 1),
                "loss": loss,
                "lr": 1e-3,
                "layer_loss": [loss * (1 + i / 4) for i in range(4)],
                "layer_rel_err": [0.5 * loss * (1 + i) for i in range(4)],
            }
        )
    for step in range(30):
        kl, ce = 3 * math.exp(-step / 10), 2 + math.exp(-step / 10)
        lines.append({"stage": 2, "step": step, "tokens": 4096 * (step + 1), "loss": kl + 0.1 * ce, "kl": kl, "ce": ce})
    lines.append({"stage": 1, "event": "nonfinite", "restored_step": 20, "lr_scale": 0.5})  # no loss: skipped
    return "\n".join(json.dumps(x) for x in lines) + "\n"


EVAL = {
    "model": "run/model",
    "teacher": "tiny-teacher",
    "limit": 100,
    "tasks": {
        "wikitext2": {
            "student": {"ppl": 21.5, "nll": 3.07, "tokens": 5000},
            "teacher": {"ppl": 19.0, "nll": 2.94, "tokens": 5000},
            "ratio": {"ppl": 1.13, "nll": 1.04, "tokens": 1.0},
        },
        "arc_easy": {
            "student": {"acc": 0.55, "acc_stderr": 0.05, "acc_norm": 0.5, "acc_norm_stderr": 0.05},
            "teacher": {"acc": 0.56, "acc_stderr": 0.05, "acc_norm": 0.52, "acc_norm_stderr": 0.05},
            "ratio": {"acc": 0.982, "acc_norm": 0.962},
        },
    },
}
PASSKEY = {
    "contexts": [256, 1024],
    "depths": [0.0, 0.5, 1.0],
    "trials": 4,
    "student": [[0.25, 0.5, 1.0], [0.0, 0.25, 1.0]],
    "teacher": [[1.0, 1.0, 1.0], [1.0, 0.75, 1.0]],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, "gateswa", {"window": 16, "full_layers": "every:2"})
    save_edited(student, run / "model")
    (run / "metrics.jsonl").write_text(_metrics())
    (run / "summary.json").write_text(json.dumps({"target": "gateswa", "stage1_tokens": 163840, "teacher": "tiny-teacher"}))
    (run / "eval.json").write_text(json.dumps(EVAL))
    bench = run_bench(student, teacher, BenchSettings([32, 64], [1, 2], 2, 1, 0), "float32", log=lambda _: None)
    last = bench["runs"][-1]  # as if the student's batch 2 at context 64 did not fit
    last["student"], last["largest_batch"], last["ratio"] = None, {"student": 1}, dict.fromkeys(last["ratio"])
    (run / "bench.json").write_text(json.dumps(bench))
    (run / "passkey.json").write_text(json.dumps(PASSKEY))
    return run


def test_full_report(run_dir):
    report = build_report(run_dir)
    text = report.read_text()
    for png in PNGS:
        assert (run_dir / png).stat().st_size > 10_000, png
        assert f"]({png})" in text
    assert "No " not in text  # every input was there
    assert "| arc_easy | acc | 0.55 ± 0.05 | 0.56 ± 0.05 | 0.982 |" in text
    assert "| wikitext2 | ppl | 21.5 | 19 | 1.130 |" in text
    assert "| 2 | 64 |" in text and "the largest batch that fits is 1" in text
    assert "| stage1 | 40 | 163,840 |" in text and "| stage2 | 30 |" in text
    assert "target **gateswa** on 4 of 4 layers" in text and "teacher `tiny-teacher`" in text
    assert "| 1,024 | 0.00 | 0.25 | 1.00 |" in text  # the student's passkey row
    # 2 of the 6 cells hold within 5 points of the teacher: (256, 1.0) and (1024, 1.0)
    assert "at most 5 points below the teacher in **2 of 6** cells" in text
    assert "over 4 keys;" in text and "Sliding layers only see their window" in text  # a GateSWA run


@pytest.mark.parametrize(
    "family, target, settings, windowed",
    [
        ("llama", "mla", {"kv_lora_rank": 8, "qk_rope_head_dim": 4}, False),
        ("llama", "gqa", {"num_key_value_heads": 1}, False),
        ("llama", "gateswa", {"window": 4, "full_layers": "every:2"}, True),
        ("gemma3", "mla", {"qk_rope_head_dim": 8}, True),  # the teacher's sliding layers stay windowed
    ],
)
def test_the_window_sentence_is_for_models_with_sliding_layers(tmp_path, family, target, settings, windowed):
    save_edited(edit_model(tiny_teacher(family), target, settings), tmp_path / "model")
    (tmp_path / "passkey.json").write_text(json.dumps(PASSKEY))
    text = build_report(tmp_path).read_text()
    assert "over 4 keys;" in text and ("Sliding layers only see their window" in text) == windowed


def test_the_report_says_when_each_passkey_key_had_its_own_filler(run_dir):
    (run_dir / "passkey.json").write_text(json.dumps({**PASSKEY, "filler": "varied"}))
    try:
        assert "over 4 keys, each with its own shuffled filler;" in build_report(run_dir).read_text()
    finally:
        (run_dir / "passkey.json").write_text(json.dumps(PASSKEY))


def test_missing_inputs_name_their_commands(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"device": "cpu", "dtype": "float32", "kv": {}, "runs": [], "teacher": "T0"}))
    text = build_report(tmp_path).read_text()
    assert f"attnedit eval {tmp_path}/model --teacher T0 --save {tmp_path}/eval.json" in text
    assert f"attnedit passkey {tmp_path}/model --teacher T0 --save {tmp_path}/passkey.json" in text
    assert "attnedit convert" in text and "No model checkpoint" in text
    assert not (tmp_path / "passkey.png").exists()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("eval.json", "{not json", "eval.json is not valid JSON"),
        ("bench.json", json.dumps({"device": "cpu"}), "bench.json lacks runs, kv"),
        ("metrics.jsonl", '{"stage": "stage1", "loss": 1}\noops\n', "metrics.jsonl line 2 is not valid JSON"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(AttnEditError, match=message):
        build_report(tmp_path)


def test_cli(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(run_dir / "report.md")
    for bad in (tmp_path / "absent", tmp_path):  # no folder; a folder with nothing a report could use
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attnedit: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("after, warned", [(5.02, True), (0.12, False)])
def test_training_that_raised_the_heldout_kl_is_said_in_the_summary_and_the_report(tmp_path, after, warned):
    """A run that ended further from the teacher than its start (an MLA start once diverged in stage 1: held-out KL
    1.18 -> 5.02) says so where the user looks: convert's printed summary and report.md."""
    from attnedit.stages import format_summary

    losses = {"student_ce": 3.0, "teacher_ce": 2.0}
    summary = {"heldout_before": {"kl": 1.18, **losses}, "heldout_after": {"kl": after, **losses}, "wall_s": 1, "model": "m"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    printed, report = format_summary(summary), build_report(tmp_path).read_text()
    assert ("warning: training raised the held-out KL from 1.18 to 5.02" in printed) is warned
    assert ("**Warning**: training raised the held-out KL" in report) is warned


def test_the_report_shows_each_stage_speed_and_its_peak_next_to_the_plan(tmp_path):
    """report.md's training section: a row per stage that ran, tok/s against the teacher's forward, and on a GPU the
    measured peak next to the plan (plan / peak - 1); a skipped stage has no row, a CPU stage no peak."""
    gib = 2**30
    summary = {
        "stage1": {"steps": 0, "tokens": 0},
        "stage2": {"steps": 10, "tokens": 40960, "wall_s": 12.0, "tok_s": 3413.3, "ratio": 0.3, "peak_memory_bytes": 8 * gib, "est_memory_bytes": 9 * gib},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = build_report(tmp_path).read_text()
    assert "| 2 | 41k | 12 s | 3,413 | 0.30x | 8.0 GiB | 9.0 GiB | +12% |" in report
    assert "| 1 |" not in report  # stage 1 skipped
    summary["stage2"].pop("peak_memory_bytes")  # a CPU run: the plan, no peak
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert "| 2 | 41k | 12 s | 3,413 | 0.30x | - | 9.0 GiB | - |" in build_report(tmp_path).read_text()


def test_the_report_shows_serving_capacity_next_to_the_kv_only_limit(tmp_path):
    """``bench --capacity``'s rows (here the H100 measurement kept in docs/, written before the cells had their
    step over the HBM bound, plus one cell that has it) become the report's capacity table."""
    bench = json.loads((ROOT / "docs/results/scale/qwen3-8b-32k-mla.json").read_text())
    bench["capacity"][0]["student"].update(hbm_bound_ms=26.7, step_over_bound=1.3214)
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    text = build_report(tmp_path).read_text()
    assert "### Serving capacity" in text
    teacher, student = bench["capacity"][0]["teacher"], bench["capacity"][0]["student"]
    assert f"| 32,768 | teacher | {teacher['largest_batch']} | {teacher['kv_only_limit']} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 32,768 | student |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == [str(student["largest_batch"]), str(student["kv_only_limit"])]
    assert cells[5:] == [f"{student['decode_tok_s']:,.0f}", f"{student['step_ms']:.2f}", "1.32",
                         f"{bench['capacity'][0]['ratio']['largest_batch']:.2f}x", f"{bench['capacity'][0]['ratio']['decode_tok_s']:.2f}x"]  # fmt: skip
