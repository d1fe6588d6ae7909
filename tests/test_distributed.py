"""Distributed conversion: the same recipe on 1 and 2 processes (torchrun, gloo, CPU), SIGKILL + resume under torchrun
(also on another world size), DCP -> Hugging Face export, a sharded frozen MoE teacher, the memory plan.
The 2-process parity run is the README's `torchrun -m attnedit`; the SIGKILL, resume and MoE runs go through
torchrun's own launcher with forked workers, all from one interpreter start-up (LAUNCHER).

Parity tolerance: 1e-4 relative on every logged loss. Each rank trains on a contiguous half of the same
global batch; FSDP2 averages the gradients, the logged figures are averaged over ranks and stage 1
normalises by the global batch's variance, so the two runs compute the same quantities in fp32 and
differ only in the order of floating-point sums (measured: <= 1e-6 relative over 5 + 5 steps).
"""

from __future__ import annotations

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

RTOL = 1e-4

# torchrun itself (its argument parsing, --standalone rendezvous and elastic agent) for each job of a JSON list,
# with the workers forked from this launcher, which imports attnedit once, instead of each worker starting an
# interpreter and importing torch and transformers again (~5 s of CPU each). The 2-process parity run below uses
# the real `torchrun -m attnedit`. A job: nproc, argv, env, kill_at ([stage, step]: rank 0, the one that logs,
# SIGKILLs itself right after logging it) and copy ([src, dst] before the launch). Prints whether each succeeded.
LAUNCHER = """
import json, os, shutil, signal, sys, uuid
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, parse_args
import attnedit.cli.convert, attnedit.stages.convert  # the forked workers start with these imported
from attnedit.cli import main
from attnedit.stages import trainer

def worker(argv, kill_at):
    if kill_at:
        write = trainer.MetricsLog.write
        def patched(self, record):
            write(self, record)
            if [record.get("stage"), record.get("step")] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        trainer.MetricsLog.write = patched
    code = main(argv)
    if code:
        sys.exit(code)  # a worker function's return value is not its exit status

def torchrun(nproc, argv, kill_at):
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "--start-method=fork", "unused"])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())  # as --standalone
    args.master_port = args.master_port or 29500
    config, _, _ = config_from_args(args)
    elastic_launch(config, worker)(argv, kill_at)

results = []
for job in json.loads(sys.argv[1]):
    if job.get("copy"):
        shutil.copytree(*job["copy"])
    saved = dict(os.environ)
    os.environ.update(job.get("env", {}))
    try:
        torchrun(job["nproc"], ["convert", *job["argv"], "--progress", "none"], job.get("kill_at"))
        results.append(True)
    except ChildFailedError:
        results.append(False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
print(json.dumps(results))
"""


def _env(**extra) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **extra}


def _torchrun(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m attnedit convert ...``, as the README runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "attnedit"]
    cmd += ["convert", *args, "--progress", "none"]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)


def _launch(jobs: list[dict], cwd: Path) -> list[bool]:
    """Run LAUNCHER's jobs (``attnedit convert`` through torchrun's launcher) in order; whether each succeeded."""
    (cwd / "launch.py").write_text(LAUNCHER)
    done = subprocess.run([sys.executable, "launch.py", json.dumps(jobs)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    ok = json.loads(done.stdout.splitlines()[-1])
    assert len(ok) == len(jobs), done.stderr[-3000:]
    return ok


def _losses(run: Path) -> list[tuple]:
    return [(r["stage"], r["step"], r["loss"]) for r in metrics(run) if "loss" in r]


def _close(a: list[tuple], b: list[tuple]) -> None:
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        assert y[2] == pytest.approx(x[2], rel=RTOL), (x, y)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    raw = tiny_raw(make_teacher_dir(root), make_docs(root / "docs.jsonl"), stage1__steps=5, stage2__steps=5)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return root


def _in_process(args: list[str], cwd: Path) -> int:
    """``attnedit convert`` on one process, run in this one (no interpreter start-up)."""
    from attnedit.cli import main

    with pytest.MonkeyPatch.context() as m:
        m.chdir(cwd)
        return main(["convert", *args, "--progress", "none"])


@pytest.fixture(scope="module")
def one(setup):
    assert _in_process([str(setup / "recipe.yaml"), "--out", "one"], setup) == 0
    return setup / "one"


@pytest.fixture(scope="module")
def two(setup):
    done = _torchrun([str(setup / "recipe.yaml"), "--out", "two"], setup, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return setup / "two"


@pytest.mark.xdist_group("distributed")
def test_two_processes_reach_the_losses_of_one(one, two):
    _close(_losses(one), _losses(two))
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    for key in ("kl", "student_ce", "teacher_ce"):
        assert s2["heldout_after"][key] == pytest.approx(s1["heldout_after"][key], rel=RTOL)
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)


@pytest.mark.xdist_group("distributed")
def test_only_rank_0_writes_and_checkpoints_are_dcp(two):
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["checkpoints", "metrics.jsonl", "model", "recipe.yaml", "recipe.yaml.sha256", "summary.json"]
        + (["tensorboard"] if (two / "tensorboard").exists() else [])
    )
    ckpts = sorted((two / "checkpoints").iterdir())
    assert ckpts and all(p.name.endswith(".dcp") for p in ckpts)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in ckpts[-1].iterdir()}
    steps = [r["step"] for r in metrics(two) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5] * 2  # one line per step: no rank but 0 logs


@pytest.fixture(scope="module")
def launched(setup) -> dict:
    """Runs through torchrun's launcher: a 2-process run whose rank 0 is SIGKILLed after logging stage 2, step 3;
    copies of it resumed on 2 and on 1 process; the MoE teacher on 2 processes with its frozen weights sharded."""
    moe = setup / "moe"
    moe.mkdir()
    raw = tiny_raw(make_teacher_dir(moe, "qwen3_moe"), make_docs(moe / "docs.jsonl"), stage1__steps=3, stage2__steps=3)
    (moe / "recipe.yaml").write_text(yaml.safe_dump(raw))
    jobs = [
        {"nproc": 2, "argv": [str(setup / "recipe.yaml"), "--out", "killed"], "kill_at": [2, 3]},
        {"nproc": 2, "argv": ["killed-2", "--resume"], "copy": ["killed", "killed-2"]},  # each resume starts from
        {"nproc": 1, "argv": ["killed-1", "--resume"], "copy": ["killed", "killed-1"]},  # the same killed state
        {"nproc": 2, "argv": [str(moe / "recipe.yaml"), "--out", str(moe / "b")], "env": {"ATTNEDIT_FROZEN": "shard"}},
    ]
    return dict(zip(["killed", "killed-2", "killed-1", "moe"], _launch(jobs, setup)))


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("resume_nproc", [2, 1])
def test_sigkill_under_torchrun_then_resume_reaches_the_same_losses(setup, one, launched, resume_nproc):
    assert launched["killed"] is False
    assert not (setup / "killed" / "model").exists()
    assert any(r.get("stage") == 2 and r.get("step") == 3 for r in metrics(setup / "killed"))
    assert launched[f"killed-{resume_nproc}"] is True
    _close(_losses(one), _losses(setup / f"killed-{resume_nproc}"))


@pytest.mark.xdist_group("distributed")
def test_dcp_checkpoint_exports_to_a_hugging_face_folder(setup, two, tmp_path):
    from transformers import AutoModelForCausalLM

    from attnedit.stages.context import export_checkpoint

    out = export_checkpoint(two, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    final = load_file(two / "model" / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in final:
            torch.testing.assert_close(p, final[name], rtol=0, atol=0)


@pytest.mark.xdist_group("distributed")
def test_moe_teacher_with_sharded_frozen_weights_matches_one_process(setup, launched):
    moe = setup / "moe"
    assert _in_process([str(moe / "recipe.yaml"), "--out", str(moe / "a")], moe) == 0
    assert launched["moe"] is True
    _close(_losses(moe / "a"), _losses(moe / "b"))


# --------------------------------------------------------------------------- the memory plan


def _qwen3_configs():
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(num_attention_heads=32, head_dim=128, vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False)
    dense = Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_key_value_heads=8, intermediate_size=12288, **common)
    moe = lambda experts: Qwen3MoeConfig(  # noqa: E731
        hidden_size=2048, num_hidden_layers=48, num_key_value_heads=4, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=experts, num_experts_per_tok=8, mlp_only_layers=[], **common,
    )  # fmt: skip
    return dense, moe


def test_memory_plan_for_the_qwen3_recipes():
    from attnedit.distributed.memory import GiB
    from attnedit.recipe import load_recipe
    from attnedit.stages.plan import memory_plan as plan_memory
    from attnedit.stages.plan import smallest_world

    root = Path(__file__).resolve().parents[1]
    dense, moe = _qwen3_configs()
    recipe = load_recipe(root / "recipes" / "qwen3-8b-mla.yaml")
    one, two = (plan_memory(dense, recipe, n, 80 * GiB) for n in (1, 2))
    frozen = one["options"]["replicate"]["stages"][0]["frozen_weights"]
    assert 15 * GiB < frozen < 16 * GiB  # 8.2 G bf16 parameters
    rep2, shard2 = (two["options"][m]["stages"][0] for m in ("replicate", "shard"))
    assert rep2["frozen_weights"] == frozen and shard2["frozen_weights"] < 0.6 * frozen
    assert rep2["optimizer"] == pytest.approx(one["options"]["replicate"]["stages"][0]["optimizer"] / 2)
    assert smallest_world(dense, recipe, 80 * GiB)[0] == 2 and smallest_world(dense, recipe, 141 * GiB)[0] == 1
    moe_recipe = load_recipe(root / "recipes" / "qwen3-30b-a3b-gateswa.yaml")
    p128, p256 = (plan_memory(moe(e), moe_recipe, 2, 80 * GiB)["options"]["shard"]["stages"][1] for e in (128, 256))
    assert p256["frozen_weights"] > 1.5 * p128["frozen_weights"]  # more experts: more weights (sharded)...
    assert p256["activations"] < 1.01 * p128["activations"]  # ...but only the routed 8 per token run


def test_dry_run_prints_the_memory_plan_for_a_world_size(setup, capsys):
    from attnedit.cli import main

    assert main(["convert", str(setup / "recipe.yaml"), "--dry-run", "--world-size", "2", "--gpu-memory", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU on 2 GPU(s)" in out and "smallest GPU count that fits 2.0 GiB: 1" in out
