"""`attnedit edit` and `attnedit inspect` as a user runs them.

The CLI is called in-process through ``attnedit.cli.main`` (what the ``attnedit`` script calls), with its
output captured; one test runs the installed entry point in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_teacher

from attnedit.cli import main


def attnedit(capsys, *args) -> tuple[int, str, str]:
    """``attnedit ARGS`` in this process: (exit code, stdout, stderr). argparse's own exits count as codes."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # --help, argparse usage errors
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "qwen3-tiny"
    tiny_teacher("qwen3").save_pretrained(path)
    return path


def test_edit_then_inspect(tmp_path, teacher_dir, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    out = tmp_path / "edited"
    code, stdout, err = attnedit(capsys, "edit", teacher_dir, "--target", "gateswa", "--set", "window=8", "--set", "sink=0",
                                 "--set", "full_layers=every:2", "--out", out, "--context", "64")  # fmt: skip
    assert code == 0, err
    assert "gateswa-sliding" in stdout and f"saved the edited (untrained) model to {out}" in stdout
    code, stdout, err = attnedit(capsys, "inspect", out, "--context", "64", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    # 2 of 4 layers full, 2 sliding with 8 of 64 tokens; teacher: 2 KV heads x 16 dims x K,V
    per_layer = 2 * 2 * 16 * 4  # float32 tiny teacher
    assert info["kv_bytes_per_token"] == pytest.approx(per_layer * (2 + 2 * 8 / 64))
    assert info["kv_ratio_vs_teacher"] == pytest.approx((2 + 2 * 8 / 64) / 4)
    assert [layer["kind"] for layer in info["layers"]] == ["gateswa-sliding", "gateswa-full"] * 2  # every:2 keeps layers 1 and 3 full
    # the parameter count read from the config is the saved model's, to the parameter
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    code, stdout, err = attnedit(capsys, "inspect", teacher_dir, "--context", "64", "--json")
    assert code == 0, err
    teacher = json.loads(stdout)
    assert {layer["kind"] for layer in teacher["layers"]} == {"dense"}
    assert teacher["kv_bytes_per_token"] == 4 * per_layer and teacher["params"] == sum(p.numel() for p in tiny_teacher("qwen3").parameters())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "mla", "--set", "kv_lora_rank=99999"], "kv_lora_rank=99999"),
        (["--target", "gateswa", "--set", "window=0"], "window=0"),
        (["--target", "gateswa", "--set", "layers=12"], "layer 12 does not exist"),
        (["--target", "mla", "--set", "rank"], "expected key=value"),
    ],
)
def test_bad_input_is_one_line(tmp_path, teacher_dir, capsys, args, message):
    code, _, err = attnedit(capsys, "edit", teacher_dir, *args, "--out", tmp_path / "x")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_not_a_model_folder(tmp_path, capsys):
    code, _, err = attnedit(capsys, "inspect", tmp_path)
    assert code == 2 and "not a model folder" in err


def test_help_reads_like_documentation(capsys):
    code, out, _ = attnedit(capsys, "edit", "--help")
    assert code == 0
    for word in ("kv_lora_rank", "window", "full_layers", "examples:"):
        assert word in out


def test_installed_entry_point_in_a_fresh_process(tmp_path, teacher_dir):
    """The one subprocess smoke test: the ``attnedit`` console script (``python -m attnedit`` where the script
    is not on PATH) starts, runs a subcommand, and reports a user error as one line with exit code 2."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    script = shutil.which("attnedit")
    cmd = [script] if script else [sys.executable, "-m", "attnedit"]
    res = subprocess.run([*cmd, "inspect", str(teacher_dir), "--context", "64", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kv_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    res = subprocess.run([*cmd, "inspect", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("attnedit: error: ") and "not a model folder" in res.stderr
