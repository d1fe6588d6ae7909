"""Checkpoint integrity: checksums with fallback to the newest good checkpoint, every
checkpoint bad, disk full raised by torch/safetensors, the divergence guard, exact summaries after
a signal between two log steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_stages import make_docs, make_teacher_dir, metrics, tiny_raw

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.distributed import checkpoint
from attnedit.distributed.checkpoint import list_checkpoints, load_latest
from attnedit.recipe import parse_recipe
from attnedit.stages import convert, stage1, trainer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    raw = tiny_raw(make_teacher_dir(root), make_docs(root / "docs.jsonl"), stage1__steps=5, stage2__steps=3, heldout_eval=False)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.fixture(scope="module")
def finished(root):
    """A finished run (its checkpoints: stage2-step000002.pt and stage2-step000003.pt)."""
    summary = convert(parse_recipe(yaml.safe_load((root / "recipe.yaml").read_text())), root / "done", progress="none")
    assert summary["stage2"]["final"]["step"] == 3
    return root / "done"


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _flip(path, at: float = 0.5, n: int = 8):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + n] = bytes(b ^ 0x5A for b in data[i : i + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: _flip(p), id="bytes-flipped"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), id="zero-length"),
    ],
)
def test_a_bad_newest_checkpoint_falls_back_to_the_newest_good_one(finished, tmp_path, capsys, damage):
    run = _copy(finished, tmp_path)
    older, newest = list_checkpoints(run)[-2:]
    damage(newest)
    state = load_latest(run)
    assert (state["stage"], state["step"]) == (2, 2), "the older, intact checkpoint"
    assert f"skipping unreadable checkpoint {newest.name}" in capsys.readouterr().err
    want = torch.load(older, weights_only=True)["model"]
    assert all(torch.equal(state["model"][k], want[k]) for k in want)


def test_resume_with_every_checkpoint_bad_stops_and_duplicates_nothing(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    for p in list_checkpoints(run):
        _flip(p, 0.3)
    before = (run / "metrics.jsonl").read_text()
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("attnedit: error: no good checkpoint") and "another --out" in err[-1]
    assert (run / "metrics.jsonl").read_text() == before
    assert not (run / "model").exists()


def _raise_after_partial(exc):
    def writer(obj, fh, *a, **k):
        fh.write(b"partial")
        raise exc

    return writer


def test_disk_full_from_torch_is_one_line_and_leaves_no_temp_file(root, tmp_path, monkeypatch):
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    real, calls = torch.save, {"n": 0}

    def failing(obj, fh, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # what torch raises when the disk fills in the middle of its zip writer
            return _raise_after_partial(
                RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed")
            )(obj, fh)
        return real(obj, fh, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    msg = str(e.value)
    assert "\n" not in msg and "inline_container" in msg and "stage1-step000000.pt is intact" in msg and "--resume" in msg
    assert not [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    convert(parse_recipe(raw), tmp_path / "run", resume=True, progress="none")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_disk_full_in_the_final_save_is_one_line_and_resumable(root, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    real = mu.safe_save_file

    def failing(tensors, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", failing)
    run = tmp_path / "run"
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), run, progress="none")
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and f"attnedit convert {run} --resume" in msg
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml", "recipe.yaml.sha256"]  # no temp folder
    monkeypatch.setattr(mu, "safe_save_file", real)
    convert(parse_recipe(raw), run, resume=True, progress="none")
    assert (run / "model" / "model.safetensors").is_file()


def _stage1_only(root: Path, **over) -> dict:
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    raw.update(over)
    raw["stage2"]["steps"] = 0
    return raw


def _patch_layer_losses(monkeypatch, change) -> None:
    """Stage 1's per-layer losses, with ``change(call, losses)`` applied to the losses of each call (1-based)."""
    real, calls = stage1.layer_losses, {"n": 0}

    def patched(*args):
        calls["n"] += 1
        losses, rel = real(*args)
        change(calls["n"], losses)
        return losses, rel

    monkeypatch.setattr(stage1, "layer_losses", patched)


def test_nonfinite_guard_skips_a_corrupt_newest_checkpoint(root, tmp_path, monkeypatch):
    raw, run = _stage1_only(root), tmp_path / "run"

    def corrupt_then_nan(call, losses):
        if call == 5:  # step 5: checkpoints of steps 2 and 4 exist; the newest went bad on disk
            _flip(list_checkpoints(run)[-1])
            losses[0] = losses[0] * float("inf")

    _patch_layer_losses(monkeypatch, corrupt_then_nan)
    convert(parse_recipe(raw), run, progress="none")
    events = [r for r in metrics(run) if r.get("event")]
    assert events == [{"stage": 1, "event": "nonfinite", "restored_step": 2, "lr_scale": 0.5}]
    assert [r["step"] for r in metrics(run) if "step" in r] == [1, 2, 3, 4, 5]


def test_a_diverging_loss_restores_like_a_nonfinite_one(root, tmp_path, monkeypatch):
    raw, run = _stage1_only(root), tmp_path / "run"

    def spike(call, losses):
        if call == 5:
            losses[0] = losses[0] + 1e20  # finite, far above its recent level

    _patch_layer_losses(monkeypatch, spike)
    summary = convert(parse_recipe(raw), run, progress="none")
    events = [r for r in metrics(run) if r.get("event")]
    assert events == [{"stage": 1, "event": "diverged", "restored_step": 4, "lr_scale": 0.5}]
    assert summary["stage1"]["final"]["loss"] < 10


def test_a_loss_that_keeps_diverging_stops_with_a_clear_message(root, tmp_path, monkeypatch):
    raw = _stage1_only(root, max_nonfinite_restarts=1)

    def diverging(call, losses):
        if call >= 4:
            losses[0] = losses[0] + 1e20

    _patch_layer_losses(monkeypatch, diverging)
    with pytest.raises(AttnEditError, match="still diverging after 1 restarts"):
        convert(parse_recipe(raw), tmp_path / "run", progress="none")


def test_divergence_guard_ignores_the_first_steps_and_can_be_turned_off():
    assert not trainer.diverged(1e9, [5.0, 4.0], 10.0)  # too few log lines yet
    assert trainer.diverged(1e9, [5.0, 4.0, 3.0], 10.0)
    assert not trainer.diverged(29.0, [5.0, 4.0, 3.0], 10.0)  # below 10 x the median (4.0)
    assert not trainer.diverged(1e9, [5.0, 4.0, 3.0], 0.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_two_log_steps_resumes_to_the_same_summary(root, tmp_path, monkeypatch, sig):
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    raw.update(log_every=3, checkpoint_every=10)
    raw["stage1"]["steps"], raw["stage2"]["steps"] = 7, 2
    ref = convert(parse_recipe(raw), tmp_path / "ref", progress="none")
    real = trainer.lr_at

    def signal_in_step_5(step, cfg):
        if step == 4 and cfg.steps == 7:
            os.kill(os.getpid(), sig)
        return real(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", signal_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    assert list_checkpoints(tmp_path / "run")[-1].name == "stage1-step000005.pt"  # between log steps 3 and 6
    monkeypatch.setattr(trainer, "lr_at", real)
    got = convert(parse_recipe(raw), tmp_path / "run", resume=True, progress="none")
    strip = lambda s: {k: v for k, v in s.items() if k not in ("tok_s", "teacher_fwd_tok_s", "ratio")}  # noqa: E731  (timings)
    for stage in ("stage1", "stage2"):
        assert strip(got[stage]["final"]) == strip(ref[stage]["final"])
    rows = lambda run: [strip(r) for r in metrics(run)]  # noqa: E731
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["stage1"]["final"]["loss"] == ref["stage1"]["final"]["loss"]
    assert saved["model"] == "model" and (tmp_path / "run" / saved["model"] / "config.json").is_file()  # relative: moves with the run


@pytest.mark.parametrize("sigs, saved", [((signal.SIGTERM, signal.SIGTERM), True), ((signal.SIGINT, signal.SIGINT), False)])
def test_a_repeated_sigterm_still_saves_the_checkpoint_and_ctrl_c_twice_stops_at_once(root, tmp_path, monkeypatch, sigs, saved):
    """`timeout` sends SIGTERM to the run and again to its process group: the second must not lose the step's
    checkpoint (an H100 run lost 60 steps so). Ctrl-C twice is a person asking to stop now."""
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    raw.update(checkpoint_every=10)
    raw["stage1"]["steps"], raw["stage2"]["steps"] = 7, 2
    real = trainer.lr_at

    def two_signals_in_step_5(step, cfg):
        if step == 4 and cfg.steps == 7:
            for sig in sigs:
                os.kill(os.getpid(), sig)
        return real(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", two_signals_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    names = [c.name for c in list_checkpoints(tmp_path / "run")]
    assert ("stage1-step000005.pt" in names) == saved


def _stopped_run(root, tmp_path, monkeypatch, docs=None):
    """A run stopped by SIGTERM after stage 1 step 2, resumable with `attnedit convert RUN --resume`."""
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    if docs is not None:
        raw["data"]["files"] = [str(docs)]
    real = trainer.lr_at

    def stop(step, cfg):
        if step == 1 and cfg.steps == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", stop)
    with pytest.raises(KeyboardInterrupt):
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    monkeypatch.setattr(trainer, "lr_at", real)
    return tmp_path / "run"


def test_resume_refuses_a_hand_edited_recipe(root, tmp_path, monkeypatch, capsys):
    run = _stopped_run(root, tmp_path, monkeypatch)
    text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(text.replace("lr: 0.003", "lr: 0.03", 1))
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "recipe.yaml was edited after the run started" in err and "another --out" in err
    (run / "recipe.yaml").write_text(text)  # put back as it was: resumes
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 0


def test_resume_refuses_a_data_file_reordered_at_the_same_size(root, tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    shutil.copy(root / "docs.jsonl", docs)
    run = _stopped_run(root, tmp_path, monkeypatch, docs)
    lines = docs.read_text().splitlines(keepends=True)
    docs.write_text("".join(lines[::-1]))
    assert docs.stat().st_size == (root / "docs.jsonl").stat().st_size
    assert main(["convert", str(run), "--resume", "--progress", "none"]) == 2
    assert "different data settings or contents" in capsys.readouterr().err.strip().splitlines()[-1]
