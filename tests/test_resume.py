"""Checkpoints and resume: SIGKILL and SIGTERM mid-run, a changed recipe, a full disk, non-finite losses."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_stages import make_docs, make_teacher_dir, metrics, tiny_raw

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.distributed import checkpoint
from attnedit.distributed.checkpoint import list_checkpoints, load_latest
from attnedit.recipe import parse_recipe
from attnedit.stages import convert, stage1

# A kill needs its own process. This script (one interpreter start-up) forks one child per run; each child runs
# the CLI, having first arranged to send itself `signal` right after it logs (stage, step). It prints each run's
# exit status (negative: the signal that ended it) and stderr as JSON.
SIGNALLER = """
import json, os, signal, sys
import attnedit.cli.convert, attnedit.stages.convert  # imported once, before any fork
from attnedit.cli import main
from attnedit.stages import trainer

def child(out, stage, step, sig, recipe):
    err = os.open(out + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    write = trainer.MetricsLog.write
    def patched(self, record):
        write(self, record)
        if (record.get("stage"), record.get("step")) == (stage, step):
            os.kill(os.getpid(), getattr(signal, sig))
    trainer.MetricsLog.write = patched
    try:
        code = main(["convert", recipe, "--out", out, "--progress", "none"])
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)

results = {}
for out, stage, step, sig in json.loads(sys.argv[2]):
    pid = os.fork()
    if pid == 0:
        child(out, stage, step, sig, sys.argv[1])
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    results[out] = {"returncode": code, "stderr": open(out + ".stderr").read()}
print(json.dumps(results))
"""
SIGNALLED = [("killed1", 1, 3, "SIGKILL"), ("killed2", 2, 3, "SIGKILL"), ("termed", 1, 3, "SIGTERM")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    raw = tiny_raw(make_teacher_dir(root), make_docs(root / "docs.jsonl"), stage1__steps=5, stage2__steps=5)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    (root / "signaller.py").write_text(SIGNALLER)
    return root


@pytest.fixture(scope="module")
def signalled(setup) -> dict:
    """``attnedit convert`` runs that signalled themselves (SIGNALLED), each in a process of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(setup / "signaller.py"), str(setup / "recipe.yaml"), json.dumps(SIGNALLED)]
    done = subprocess.run(cmd, cwd=setup, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _convert(args: list[str], cwd: Path, monkeypatch) -> int:
    """``attnedit convert`` in this process, from the folder ``cwd``."""
    with monkeypatch.context() as m:
        m.chdir(cwd)
        return main(["convert", *args, "--progress", "none"])


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    timing = {"tok_s", "teacher_fwd_tok_s", "ratio"}  # measured speed differs between any two runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert sa["heldout_after"] == sb["heldout_after"]


@pytest.fixture(scope="module")
def reference(setup):
    with pytest.MonkeyPatch.context() as m:
        assert _convert([str(setup / "recipe.yaml"), "--out", "ref"], setup, m) == 0
    return setup / "ref"


@pytest.mark.xdist_group("resume-signalled")
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(setup, reference, signalled, stage, monkeypatch):
    run = f"killed{stage}"
    assert signalled[run]["returncode"] == -9
    assert not (setup / run / "model").exists()
    last = list_checkpoints(setup / run)[-1].name
    assert last == f"stage{stage}-step000002.pt"  # step 3 was logged, never checkpointed
    assert any(r.get("stage") == stage and r.get("step") == 3 for r in metrics(setup / run))
    assert _convert([run, "--resume"], setup, monkeypatch) == 0
    _same_run(reference, setup / run)


@pytest.mark.slow
@pytest.mark.xdist_group("resume-signalled")
def test_sigterm_saves_a_checkpoint_then_resume_finishes(setup, reference, signalled, monkeypatch):
    done = signalled["termed"]
    assert done["returncode"] == 130, done["stderr"]
    assert "checkpoint saved" in done["stderr"] and "--resume" in done["stderr"]
    assert list_checkpoints(setup / "termed")[-1].name == "stage1-step000003.pt"
    assert _convert(["termed", "--resume"], setup, monkeypatch) == 0
    _same_run(reference, setup / "termed")


def test_resume_refuses_a_different_recipe(setup, reference, capsys, monkeypatch):
    monkeypatch.chdir(setup)
    assert main(["convert", "recipe.yaml", "--out", "ref", "--resume", "--set", "stage2.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnedit: error: ") and "different recipe" in err and "stage2.lr" in err
    assert err.count("\n") == 1
    assert main(["convert", "ref"]) == 2
    assert "add --resume" in capsys.readouterr().err
    assert main(["convert", "recipe.yaml", "--out", "ref"]) == 2  # a new run never writes over an old one
    assert "already exists" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(setup, reference, tmp_path, monkeypatch):
    raw = yaml.safe_load((setup / "recipe.yaml").read_text())
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, fh, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # step 0 and step 2 succeed; step 4 fills the disk half-way
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), run, progress="none")
    msg = str(e.value)
    assert "No space left on device" in msg and "stage1-step000002.pt is intact" in msg and "--resume" in msg
    assert "\n" not in msg
    assert [p.name for p in list_checkpoints(run)] == ["stage1-step000000.pt", "stage1-step000002.pt"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file left
    assert load_latest(run)["step"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    convert(parse_recipe(raw), run, resume=True, progress="none")
    _same_run(reference, run)  # the failed save cost nothing: same weights, losses and held-out figures


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(setup, reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(b"garbage")
    state = load_latest(run)
    assert state is not None and (state["stage"], state["step"]) != (2, 5)
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


def test_nonfinite_loss_restores_and_halves_the_lr(setup, tmp_path, monkeypatch):
    raw = yaml.safe_load((setup / "recipe.yaml").read_text())
    raw["stage2"]["steps"] = 0
    real = stage1.layer_losses
    calls = {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        losses, rel = real(*args)
        if calls["n"] == 4:
            losses[0] = losses[0] * float("nan")
        return losses, rel

    monkeypatch.setattr(stage1, "layer_losses", sometimes_nan)
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    rows = metrics(tmp_path / "run")
    events = [r for r in rows if r.get("event") == "nonfinite"]
    assert len(events) == 1 and events[0]["restored_step"] == 2 and events[0]["lr_scale"] == 0.5
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert summary["stage1"]["final"]["step"] == 5


def test_a_loss_that_stays_nonfinite_stops_with_a_clear_message(setup, tmp_path, monkeypatch):
    raw = yaml.safe_load((setup / "recipe.yaml").read_text())
    raw["max_nonfinite_restarts"] = 2
    monkeypatch.setattr(stage1, "layer_losses", lambda *a: ([torch.tensor(float("inf"), requires_grad=True)], [0.0]))
    with pytest.raises(AttnEditError, match="still non-finite after 2 restarts"):
        convert(parse_recipe(raw), tmp_path / "run", progress="none")


def test_a_failure_of_the_code_in_stage_2_says_what_is_kept_and_resume_finishes_the_run(setup, reference, capsys, monkeypatch):
    """Not bad input but a crash (a library's, the machine's) after stage 1: the traceback propagates, one line
    says which checkpoint is kept and the command that continues, and --resume gives the uninterrupted run."""
    from attnedit.stages import stage2

    real, calls = stage2.kd_terms, {"n": 0}

    def fails_at_the_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("Unexpected state: target_frame.early_stop is set")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(stage2, "kd_terms", fails_at_the_second_step)
        with pytest.raises(RuntimeError, match="early_stop"):
            _convert([str(setup / "recipe.yaml"), "--out", "crashed"], setup, m)
    err = capsys.readouterr().err
    newest = list_checkpoints(setup / "crashed")[-1].name
    assert (
        f"attnedit: the run stopped (RuntimeError: Unexpected state: target_frame.early_stop is set); its training up to checkpoint {newest} is kept: attnedit convert crashed --resume continues from there"
        in err
    )
    assert _convert(["crashed", "--resume"], setup, monkeypatch) == 0
    _same_run(reference, setup / "crashed")
