"""`attnedit edit` and `attnedit inspect` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import tiny_teacher


def attnedit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "attnedit", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "qwen3-tiny"
    tiny_teacher("qwen3").save_pretrained(path)
    return path


def test_edit_then_inspect(tmp_path, teacher_dir):
    out = tmp_path / "edited"
    res = attnedit("edit", str(teacher_dir), "--target", "gateswa", "--set", "window=8", "--set", "sink=0", "--set", "full_layers=every:2",
                   "--out", str(out), "--context", "64")
    assert res.returncode == 0, res.stderr
    assert "gateswa-sliding" in res.stdout and "saved the edited" in res.stdout
    res = attnedit("inspect", str(out), "--context", "64", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    # 2 of 4 layers full, 2 sliding with 8 of 64 tokens; teacher: 2 KV heads x 16 dims x K,V
    per_layer = 2 * 2 * 16 * 4  # float32 tiny teacher
    assert info["kv_bytes_per_token"] == pytest.approx(per_layer * (2 + 2 * 8 / 64))
    assert info["params"] > 0 and info["kv_ratio_vs_teacher"] == pytest.approx((2 + 2 * 8 / 64) / 4)
    res = attnedit("inspect", str(teacher_dir), "--context", "64")
    assert res.returncode == 0 and "dense" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "mla", "--set", "kv_lora_rank=99999"], "kv_lora_rank=99999"),
        (["--target", "gateswa", "--set", "window=0"], "window=0"),
        (["--target", "gateswa", "--set", "layers=12"], "layer 12 does not exist"),
        (["--target", "mla", "--set", "rank"], "expected key=value"),
    ],
)
def test_bad_input_is_one_line(tmp_path, teacher_dir, args, message):
    res = attnedit("edit", str(teacher_dir), *args, "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_not_a_model_folder(tmp_path):
    res = attnedit("inspect", str(tmp_path))
    assert res.returncode == 2 and "not a model folder" in res.stderr


def test_help_reads_like_documentation():
    res = attnedit("edit", "--help")
    assert res.returncode == 0
    for word in ("kv_lora_rank", "window", "full_layers", "examples:"):
        assert word in res.stdout
