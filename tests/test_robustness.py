"""Hostile paths and settings, case by case, then every subcommand against the same hostile paths.

Each case ends in one line on stderr (``attnedit: error: ...``, exit code 2) that says what to do, or works
correctly; no case loses an input or finished work. The CLI runs in this process (``attnedit.cli.main``);
the one case that needs a process of its own (Ctrl-C while the command is still importing) starts one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_stages import make_docs, make_teacher_dir, tiny_raw

from attnedit import AttnEditError
from attnedit.cli import main

pytestmark = pytest.mark.xdist_group("robustness")  # one worker builds the shared run folder once

TINY_EVAL = {"bench": {"contexts": [32], "batches": [1], "decode_tokens": 2, "repeats": 1, "warmup": 0, "stock": False}}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``attnedit ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own exits
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def one_line(capsys, *args) -> str:
    """Run a command that must fail: exit code 2 and exactly one line on stderr; returns that line."""
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("attnedit: error: "), (code, err)
    return lines[0]


def error_line(capsys, *args) -> str:
    """Run a command that fails after loading (its progress bars come first): exit code 2, no traceback, and
    the error as stderr's last line."""
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("attnedit: error: "), (code, err)
    return lines[-1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes, and every folder (as None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def can_write(folder: Path) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Path:
    """A folder nothing can be written in: a read-only one, or (as root, who may write anywhere else) /sys."""
    folder = tmp_path_factory.mktemp("read-only")
    folder.chmod(0o555)
    if can_write(folder):
        folder = Path("/sys")
        if not folder.is_dir() or can_write(folder):
            pytest.skip("no unwritable folder on this machine")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny teacher (with tokenizer), an edited MLA model, a finished run with a bench, and hostile files."""
    root = tmp_path_factory.mktemp("robust")
    teacher = make_teacher_dir(root)
    docs = make_docs(root / "docs.jsonl", n=120)
    raw = tiny_raw(teacher, docs, stage1__steps=1, stage2__steps=1, baseline_batches=0, eval=TINY_EVAL)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["convert", str(recipe), "--out", str(root / "run"), "--progress", "none"]) == 0
    corrupt = root / "teacher-corrupt"
    shutil.copytree(teacher, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    (root / "afile").write_text("mine")
    return {"root": root, "teacher": teacher, "recipe": recipe, "run": root / "run", "model": root / "run" / "model",
            "corrupt": corrupt, "docs": docs, "afile": root / "afile"}  # fmt: skip


# ------------------------------------------------------------------------------- 1. output paths


def test_output_paths_are_checked_before_the_teacher_is_loaded(assets, unwritable, capsys, monkeypatch):
    import attnedit.teachers

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded before the output path was checked")

    monkeypatch.setattr(attnedit.teachers, "load_model", no_load)
    teacher = assets["teacher"]
    line = one_line(capsys, "edit", teacher, "--target", "mla", "--out", unwritable / "x")
    assert f"--out {unwritable / 'x'} cannot be written" in line and "choose a place you can write to" in line
    line = one_line(capsys, "edit", teacher, "--target", "mla", "--out", assets["afile"] / "sub")
    assert f"{assets['afile']} is a file, not a folder" in line
    line = one_line(capsys, "export", assets["model"], "--format", "hf", "--out", unwritable / "x")
    assert "cannot be written" in line


def test_a_failed_write_says_why_not_always_the_disk(tmp_path, unwritable):
    from attnedit.io import write_text

    with pytest.raises(AttnEditError) as e:
        write_text(unwritable / "x.json", "{}")
    assert "choose a place you can write to" in str(e.value) and "disk space" not in str(e.value)
    with pytest.raises(AttnEditError, match="free disk space"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
            write_text(tmp_path / "deep" / "x.json", "{}")
    assert not (tmp_path / "deep").exists()  # the folder made for the file went with it


# ------------------------------------------------------------------- 2. finished work is kept


@pytest.mark.parametrize("command", ["eval", "bench", "passkey"])
def test_results_are_printed_before_they_are_saved_and_kept_when_saving_fails(assets, tmp_path, capsys, monkeypatch, command):
    real = Path.write_text

    def full_disk(self, *a, **k):  # the disk fills up when --save is written, after the measuring
        if "out.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    args = {
        "eval": ["--tasks", "wikitext2", "--ppl-tokens", "200", "--data-dir", tmp_path / "data"],
        "bench": ["--contexts", "32", "--batches", "1", "--decode-tokens", "2", "--repeats", "1", "--no-stock"],
        "passkey": ["--contexts", "256", "--depths", "0.5", "--trials", "1"],
    }[command]
    if command == "eval":
        (tmp_path / "data" / "wikitext-2-raw").mkdir(parents=True)
        (tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text(assets["docs"].read_text()[:4000])
    code, out, err = run_cli(capsys, command, assets["model"], "--teacher", assets["teacher"], *args,
                             "--device", "cpu", "--save", tmp_path / "out.json")  # fmt: skip
    assert code == 2 and err.strip().splitlines()[-1].endswith("the results are printed above as JSON"), err
    assert "No space left on device; free disk space" in err
    table, _, dumped = out.partition("\n{")
    assert table.strip() and json.loads("{" + dumped)["model"] == str(assets["model"])  # the table, then every figure


# -------------------------------------------------------------------------- 3. corrupt weights


@pytest.mark.parametrize("damage", [lambda b: b[:1000], lambda b: b"garbage, not a header" + b[30:]])
def test_unreadable_weights_are_one_line_naming_the_file(tmp_path, assets, damage):
    from attnedit.teachers import load_model

    folder = tmp_path / "t"
    shutil.copytree(assets["teacher"], folder)
    (folder / "model.safetensors").write_bytes(damage((folder / "model.safetensors").read_bytes()))
    with pytest.raises(AttnEditError) as e:
        load_model(str(folder))
    assert "cannot read the weights of" in str(e.value) and "model.safetensors" in str(e.value)
    assert "damaged or incomplete" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------- 4. one KV figure everywhere


def test_every_command_reports_the_same_cache_bytes_with_its_dtype(assets, capsys):
    """A tiny Llama -> MLA run on the CPU (float32): inspect, the dry-run plan, summary.json (what the report
    prints) and the bench give the same bytes per token, each naming float32; the report's header names the
    settings the edit chose, not their defaults' None."""
    run, model = assets["run"], assets["model"]
    code, out, _ = run_cli(capsys, "inspect", model, "--context", "128", "--json")
    inspected = json.loads(out)
    assert code == 0 and inspected["dtype"] == "float32"
    per_token = inspected["kv_bytes_per_token"]
    assert per_token == 4 * (16 + 8) * 4  # 4 layers x (kv_lora_rank 16 + rope key 8) x 4 bytes
    code, out, _ = run_cli(capsys, "convert", run / "recipe.yaml", "--dry-run", "--json")
    plan = json.loads(out)
    assert (plan["kv_dtype"], plan["kv_bytes_per_token"]["edited"]) == ("float32", per_token)
    assert plan["kv_context"] == 512  # the teacher's longest context, not 8192
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kv"]["dtype"] == "float32" and set(summary["kv"]["student"]["bytes_per_token"]) == {per_token}
    bench = json.loads((run / "bench.json").read_text())
    assert bench["dtype"] == "float32" and bench["kv"]["student"]["bytes_per_token"] == [per_token]
    cell = bench["runs"][0]["student"]
    assert cell["kv_bytes_measured"] == cell["kv_bytes_analytic"]
    report = (run / "report.md").read_text()
    assert "for a float32 cache" in report and "| 128 | 384 B | 1.0 KiB |" in report
    assert "The bench ran with a float32 cache; the bytes its caches allocated equal the analytic figure in every cell." in report
    assert "kv_lora_rank=16" in report and "qk_rope_head_dim=8" in report and "=None" not in report.split("## Summary")[0]


# --------------------------------------------------------------------------- 5. inputs are kept


def test_overwrite_never_replaces_an_input(tmp_path, assets, capsys):
    teacher = tmp_path / "t_self"
    shutil.copytree(assets["teacher"], teacher)
    before = snapshot(tmp_path)
    for out in (teacher, tmp_path):  # the teacher's folder, or a folder holding it
        line = one_line(capsys, "edit", teacher, "--target", "mla", "--out", out, "--overwrite")
        assert "the input" in line and "would replace it" in line
    line = one_line(capsys, "export", teacher, "--format", "hf", "--out", teacher, "--overwrite")
    assert "would replace it" in line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------- 6. impossible GateSWA settings


def test_gateswa_settings_are_checked_against_the_teachers_context_and_layers(tmp_path, assets, capsys):
    line = one_line(capsys, "edit", assets["teacher"], "--target", "gateswa", "--set", "window=5000", "--out", tmp_path / "x")
    assert "covers the teacher's whole context (512 tokens)" in line and "use a window below 508" in line
    code, out, err = run_cli(capsys, "edit", assets["teacher"], "--target", "gateswa", "--set", "window=8",
                             "--set", "full_layers=every:6", "--out", tmp_path / "y")  # fmt: skip
    assert code == 0, err
    assert "full_layers=every:6 keeps no full layer on this 4-layer model" in out
    assert "context               512 tokens, cache dtype float32 (the model's longest; 8,192 asked)" in out


# ------------------------------------------------------------------------------ 7. no tokenizer


def test_a_teacher_without_tokenizer_is_said_and_can_be_given_one(tmp_path, assets, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(assets["teacher"] / name, bare / name)
    code, _, err = run_cli(capsys, "edit", bare, "--target", "mla", "--out", tmp_path / "a", "--context", "64")
    assert code == 0 and "has no tokenizer" in err and "--tokenizer" in err
    code, _, err = run_cli(capsys, "edit", bare, "--target", "mla", "--out", tmp_path / "b", "--tokenizer", assets["teacher"])
    assert code == 0 and "warning" not in err and (tmp_path / "b" / "tokenizer.json").is_file()
    line = one_line(capsys, "edit", bare, "--target", "mla", "--out", tmp_path / "c", "--tokenizer", tmp_path / "absent")
    assert "cannot load a tokenizer" in line and not (tmp_path / "c").exists()


# ------------------------------------------------------------------ 8. errors name what the user set


def test_an_error_names_the_setting_the_user_gave(tmp_path, assets, capsys):
    line = one_line(capsys, "edit", assets["teacher"], "--target", "mla", "--set", "qk_rope_head_dim=64", "--out", tmp_path / "x")
    assert "qk_rope_head_dim=64 is more than the teacher's head_dim 16" in line and "-48" not in line


# ------------------------------------------------------------------------------ 9. resume says what


@pytest.mark.slow
def test_resume_says_what_it_rebuilds_and_redoes_what_depended_on_it(tmp_path, assets, capsys):
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(assets["run"], rebuilt)
    shutil.rmtree(rebuilt / "model")
    bench = (rebuilt / "bench.json").read_bytes()
    code, _, err = run_cli(capsys, "convert", rebuilt, "--resume", "--progress", "none")
    assert code == 0, err
    assert f"{rebuilt / 'model'} is missing: rebuilding it from the final checkpoint (stage 2, step 1)" in err
    assert "bench.json, report.md were made from these weights and are kept" in err
    assert (rebuilt / "bench.json").read_bytes() == bench  # the same weights: nothing to measure again

    again = tmp_path / "again"
    shutil.copytree(assets["run"], again)
    shutil.rmtree(again / "model")
    shutil.rmtree(again / "checkpoints")
    code, _, err = run_cli(capsys, "convert", again, "--resume", "--progress", "none")
    assert code == 0, err
    assert f"{again} has no checkpoint to continue from" in err and "training from the start" in err
    assert f"bench.json, report.md came from a model this run replaces: moved to {again / 'earlier-model'}" in err
    assert (again / "earlier-model" / "bench.json").read_bytes() == bench  # kept, not lost
    assert json.loads((again / "bench.json").read_text())["runs"]  # and measured again for the new model


# --------------------------------------------------------------------------------------- 10. smaller


def test_a_list_where_one_value_belongs_is_refused(tmp_path, assets, capsys):
    raw = yaml.safe_load(assets["recipe"].read_text())
    raw["device"] = ["cpu"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    line = one_line(capsys, "recipe", tmp_path / "r.yaml")
    assert "device: expected one value, got ['cpu']" in line and "device: cpu" in line


def test_ctrl_c_while_importing_is_one_line(tmp_path, assets):
    """SIGINT arrives while the command imports torch (a real signal, in a process of its own). The child first
    makes SIGINT deliverable as in a terminal: a process inherits its parent's ignored signals and signal mask, and
    a test worker's need not be a shell's (a full CI run once saw the signal never arrive, exit code 0)."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import builtins, os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "real = builtins.__import__\n"
        "def hook(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hook\n"
        "from attnedit.cli import main\n"
        f"sys.exit(main(['inspect', {str(assets['teacher'])!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 130 and res.stderr.strip() == "attnedit: interrupted", res.stderr


def test_an_unreachable_hub_id_says_it_is_not_available_offline(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = one_line(capsys, "inspect", "attnedit-tests/no-such-model")
    assert "the Hugging Face hub cannot be reached" in line and "is config.json valid" not in line
    line = one_line(capsys, "inspect", "/no/such/folder")
    assert "/no/such/folder does not exist" in line


def test_the_readme_loads_the_tokenizer_without_a_prompt():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calls = [line for line in readme.splitlines() if "AutoTokenizer.from_pretrained(" in line]
    assert calls and all("trust_remote_code=True" in line for line in calls)


# ---------------------------------------------------------------------------------------- the sweep

# Every subcommand, each hostile path. A command reads an input (a model, a teacher, a recipe or a run
# folder) and may write an output (a folder, or a file); the same six hostile paths go where each belongs:
#   unwritable      the output goes where nothing can be written
#   file-as-folder  the output's folder is a file (for a command that writes nothing: the input's)
#   existing        the output exists and holds the user's work (no --overwrite)
#   same-as-input   the output is the input, or one of its files (with --overwrite where the command has it)
#   missing         the input does not exist
#   corrupt         the input is damaged: weights cut short, config.json or recipe not parseable, a run's JSON garbage
# A command that writes nothing (inspect, recipe) has no output to make hostile: those three do not apply.
# Each case must end in one line on stderr and exit code 2, with every file under the assets unchanged.

KINDS = ("unwritable", "file-as-folder", "existing", "same-as-input", "missing", "corrupt")
PAIR = {
    "eval": ["--tasks", "wikitext2", "--ppl-tokens", "200"],
    "bench": ["--contexts", "32", "--batches", "1", "--decode-tokens", "2", "--repeats", "1", "--no-stock"],
    "passkey": ["--contexts", "256", "--depths", "0.5", "--trials", "1"],
}
# name: (input key, corrupt input key, output: "folder" | "file" | None, argv(assets, input, output, overwrite))
COMMANDS = {
    "edit": ("teacher", "corrupt", "folder", lambda a, i, o, w: ["edit", i, "--target", "mla", "--out", o, *["--overwrite"] * w]),
    "convert": ("recipe", "recipe-corrupt", "folder", lambda a, i, o, w: ["convert", i, "--out", o, "--progress", "none"]),
    "export": ("model", "model-corrupt", "folder", lambda a, i, o, w: ["export", i, "--format", "hf", "--out", o, *["--overwrite"] * w]),
    **{
        name: (
            "model",
            "model-corrupt",
            "file",
            lambda a, i, o, w, name=name: [name, i, "--teacher", a["teacher"], *PAIR[name], "--device", "cpu", "--save", o, *["--overwrite"] * w],
        )  # fmt: skip
        for name in ("eval", "bench", "passkey")
    },
    "report": ("run", "run-corrupt", "file", lambda a, i, o, w: ["report", i, "--compare", "--out", o, *["--overwrite"] * w]),
    "inspect": ("model", "model-bad-config", None, lambda a, i, o, w: ["inspect", i]),
    "recipe": ("recipe", "recipe-garbage", None, lambda a, i, o, w: ["recipe", i]),
}
CASES = [(c, k) for c in COMMANDS for k in KINDS if COMMANDS[c][2] or k in ("file-as-folder", "missing", "corrupt")]


@pytest.fixture(scope="module")
def hostile(assets):
    """Damaged copies of the inputs, the user's existing work, and the data the evaluation reads."""
    root = assets["root"]
    extra = {}
    extra["model-corrupt"] = root / "model-corrupt"
    shutil.copytree(assets["model"], extra["model-corrupt"])
    weights = extra["model-corrupt"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    extra["model-bad-config"] = root / "model-bad-config"
    shutil.copytree(assets["model"], extra["model-bad-config"])
    (extra["model-bad-config"] / "config.json").write_text('{"model_type": "attnedit", ')
    raw = yaml.safe_load(assets["recipe"].read_text())
    extra["recipe-corrupt"] = root / "recipe-corrupt.yaml"
    extra["recipe-corrupt"].write_text(yaml.safe_dump({**raw, "teacher": str(assets["corrupt"])}))
    extra["recipe-garbage"] = root / "recipe-garbage.yaml"
    extra["recipe-garbage"].write_text("teacher: [unclosed\n  target: mla\n")
    extra["run-corrupt"] = root / "run-corrupt"
    shutil.copytree(assets["run"], extra["run-corrupt"])
    (extra["run-corrupt"] / "summary.json").write_text('{"teacher": ')
    (root / "mine").mkdir()
    (root / "mine" / "keep.txt").write_text("the user's work")
    (root / "mine.json").write_text("the user's work")
    data = root / "data" / "wikitext-2-raw"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text(assets["docs"].read_text()[:4000])
    return {**assets, **extra, "data": root / "data"}


def hostile_argv(a: dict, unwritable: Path, command: str, kind: str) -> list:
    key, corrupt, output, argv = COMMANDS[command]
    suffix = {"folder": "", "file": ".json" if command != "report" else ".md", None: ""}[output]
    inp, out, overwrite = a[key], a["root"] / f"new-{command}{suffix}", False
    if kind == "unwritable":
        out = unwritable / f"x{suffix}"
    elif kind == "file-as-folder" and output:
        out = a["afile"] / f"sub{suffix}"
    elif kind == "file-as-folder":
        inp = a["afile"] / "sub"
    elif kind == "existing":
        out = a["root"] / ("mine" if output == "folder" else "mine.json")
    elif kind == "same-as-input":
        overwrite = True
        if command == "convert":  # a run folder is always new: the teacher's folder is the input it could replace
            out = a["teacher"]
        elif output == "folder":
            out = inp
        else:  # a file of the input
            out = inp / ("summary.json" if command == "report" else "config.json")
    elif kind == "missing":
        inp = a["root"] / ("absent.yaml" if key == "recipe" else "absent")
    else:
        inp = a[corrupt]
    return argv(a, inp, out, overwrite)


@pytest.mark.parametrize("command,kind", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_every_command_against_every_hostile_path(hostile, unwritable, capsys, monkeypatch, command, kind):
    monkeypatch.setenv("ATTNEDIT_SHARED_DATA", str(hostile["data"]))
    before = snapshot(hostile["root"])
    line = one_line(capsys, *hostile_argv(hostile, unwritable, command, kind))
    assert "Traceback" not in line
    assert snapshot(hostile["root"]) == before, f"{command} {kind} changed files: {line}"


# ---------------------------------------------------------------------- a full disk, a large teacher


def _full_disk(flavour: str):
    """``save_pretrained``'s safetensors write, failing as a full disk does after writing part of the file."""
    from safetensors import SafetensorError

    def failing(tensors, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        if flavour == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return failing


@pytest.mark.parametrize("flavour", ["oserror", "safetensors"])
@pytest.mark.parametrize("command", ["edit", "export-hf", "export-deepseek_v3"])
def test_a_full_disk_while_writing_a_model_is_one_line_and_leaves_no_folder(hostile, capsys, monkeypatch, command, flavour):
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", _full_disk(flavour))
    out = hostile["root"] / "new-parent" / "model"  # a folder the write would create, too
    if command == "edit":
        argv = ["edit", hostile["teacher"], "--target", "mla", "--out", out]
    else:
        argv = ["export", hostile["model"], "--format", command.split("-")[1], "--out", out, "--no-check"]
    before = snapshot(hostile["root"])
    line = error_line(capsys, *argv)
    assert f"could not write {out}: No space left on device" in line and "free disk space and retry" in line
    assert snapshot(hostile["root"]) == before  # no partial folder, no temporary one, no parent made for it


def test_a_full_disk_while_convert_writes_its_model_is_one_line_and_resumable(assets, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", _full_disk("oserror"))
    raw = yaml.safe_load(assets["recipe"].read_text())
    raw["eval"] = {}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    line = error_line(capsys, "convert", tmp_path / "r.yaml", "--out", run, "--progress", "none")
    assert "No space left on device" in line and f"attnedit convert {run} --resume" in line
    assert not (run / "model").exists() and not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_weights_stream_from_the_file_without_a_second_copy(assets, monkeypatch):
    """On the CPU in the file's dtype, every parameter of a loaded teacher is the memory-mapped safetensors
    file itself (no copy in the process's own memory); for a GPU the loader hands transformers the device
    (``device_map``), so each tensor goes from the mapped file to the GPU and no full copy is made on the host."""
    import torch
    from transformers import AutoModelForCausalLM

    from attnedit.teachers import load_model

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    model, _ = load_model(str(assets["teacher"]), dtype=torch.float32)
    weights = str(assets["teacher"] / "model.safetensors")
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps.read_text().splitlines() if line.endswith(weights)]
    assert mapped, "the weights file is not memory-mapped"
    params = list(model.parameters())
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in mapped) for p in params)

    class Stop(Exception):
        pass

    seen = {}

    def spy(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(Stop):
        load_model(str(assets["teacher"]), dtype=torch.bfloat16, device="cuda:0")
    assert seen["device_map"] == torch.device("cuda:0")


def test_a_missing_gguf_teacher_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    """The shipped Qwen2.5 recipes read a GGUF that a repo script assembles: its absence names the script; any
    other missing GGUF asks for the path."""
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path))
    line = one_line(capsys, "inspect", str(tmp_path / "qwen2.5-coder-0.5b-instruct.gguf"))
    assert "does not exist" in line and "benchmarks/qwen2.5_coder_teacher.sh" in line
    line = one_line(capsys, "inspect", str(tmp_path / "other.gguf"))
    assert "does not exist; fix the path" in line and "qwen2.5_coder_teacher" not in line
