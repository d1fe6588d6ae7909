"""The one memory model fitting the stages to a GPU: the largest micro-batch that fits, gradient accumulation
raised to keep the global batch, gradient checkpointing where no micro-batch fits without it, and a one-line
refusal where nothing fits. On the CPU, with a pretend GPU size (the memory model counts the CPU's terms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_stages import make_docs, make_teacher_dir, metrics, tiny_raw

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.distributed import Parallelism
from attnedit.distributed.memory import stage_bytes
from attnedit.recipe import parse_recipe
from attnedit.stages import convert
from attnedit.stages import plan as plan_module
from attnedit.surgery import edited_config
from attnedit.teachers import load_config

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {"root": root, "teacher": make_teacher_dir(root), "docs": make_docs(root / "docs.jsonl")}


def _totals(raw: dict) -> dict:
    """stage -> {(micro-batch, gradient checkpointing): bytes needed} on this CPU, one process."""
    recipe = parse_recipe(raw)
    config = load_config(recipe.teacher)
    edited = edited_config(config, recipe.target, recipe.target_args)
    plan = plan_module.plan_memory(recipe, config, edited, torch.device("cpu"), Parallelism(), None)
    out = {}
    for n, load in plan.loads.items():
        out[n] = {(b, gc): stage_bytes(plan.sizes, load, plan.layout, plan.wbytes, b, gc)["total"] for b in (1, 2, 4) for gc in (False, True)}
    return out


def test_a_stage_too_big_for_the_gpu_runs_at_the_largest_micro_batch_that_fits(tiny, monkeypatch, capsys):
    """Stage 1 fits the pretend GPU at 2 sequences, not at the recipe's 4: it runs 2 x 2 (the same global batch of
    4), exactly as a recipe asking for 2 x 2 does, says so on stderr and in summary.json; stage 2 fits as asked."""
    raw = tiny_raw(tiny["teacher"], tiny["docs"], stage1__steps=3, stage1__seq_len=128, stage2__steps=2, heldout_eval=False)
    totals = _totals(raw)
    gpu = (totals[1][(2, False)] + totals[1][(4, False)]) / 2
    assert totals[2][(4, False)] < gpu  # stage 2 fits as the recipe says
    monkeypatch.setattr(plan_module, "device_memory", lambda device: gpu)
    summary = convert(parse_recipe(raw), tiny["root"] / "fitted", progress="lines")
    err = capsys.readouterr().err
    assert "stage 1 at the recipe's micro-batch of 4 needs" in err and "runs it at micro-batch 2 with grad_accum 2" in err
    fitted = summary["stage1"]["fitted_to_gpu"]
    assert (fitted["batch_size"], fitted["grad_accum"], fitted["recipe_batch_size"], fitted["recipe_grad_accum"]) == (2, 2, 4, 1)
    assert fitted["planned_bytes"] <= gpu < fitted["planned_bytes_at_recipe_batch"] and fitted["gpu_bytes"] == int(gpu)
    assert "fitted_to_gpu" not in summary["stage2"]
    assert json.loads((tiny["root"] / "fitted" / "summary.json").read_text())["stage1"]["fitted_to_gpu"] == fitted
    assert summary["stage1"]["tokens"] == 3 * 4 * 128  # the recipe's tokens per step

    monkeypatch.setattr(plan_module, "device_memory", lambda device: None)
    same = dict(raw, stage1={**raw["stage1"], "batch_size": 2, "grad_accum": 2})
    convert(parse_recipe(same), tiny["root"] / "asked", progress="none")
    losses = [[(r["stage"], r["step"], r["loss"]) for r in metrics(tiny["root"] / run) if "loss" in r] for run in ("fitted", "asked")]
    assert losses[0] == losses[1]


def test_stage_2_turns_gradient_checkpointing_on_only_where_no_micro_batch_fits_without_it(tiny, monkeypatch):
    raw = tiny_raw(tiny["teacher"], tiny["docs"], stage1__steps=0, stage2__seq_len=128)
    totals = _totals(raw)[2]
    assert totals[(1, True)] < totals[(1, False)]
    recipe = parse_recipe(raw)
    config = load_config(recipe.teacher)
    edited = edited_config(config, recipe.target, recipe.target_args)
    gpu = (totals[(1, True)] + totals[(1, False)]) / 2
    plan = plan_module.fit_stages(recipe, config, edited, torch.device("cpu"), Parallelism(), gpu)
    stage = plan.stages[1]
    assert stage.cfg.gradient_checkpointing is True and stage.cfg.batch_size * stage.cfg.grad_accum == 4
    assert plan.rows[2]["total"] <= gpu
    roomy = plan_module.fit_stages(recipe, config, edited, torch.device("cpu"), Parallelism(), totals[(1, False)] * 1.001)
    assert roomy.stages[1].cfg.gradient_checkpointing is False and roomy.stages[1].cfg.batch_size == 1  # smaller micro-batch first


def test_stage_2_recomputes_the_fewest_first_layers_that_fit_where_the_recipe_leaves_checkpointing_off(tiny):
    """Where no micro-batch fits without gradient checkpointing, convert recomputes the fewest of the first layers
    that fit (each recomputed layer costs its forward again) at the largest micro-batch that fits with them; the
    student recomputes exactly those, and the plan says how many. A recipe that asks for checkpointing recomputes
    every layer."""
    import types

    from attnedit.distributed.memory import micro_batches
    from attnedit.stages.format import fit_text

    raw = tiny_raw(tiny["teacher"], tiny["docs"], stage1__steps=0, stage2__seq_len=128)
    recipe = parse_recipe(raw)
    config = load_config(recipe.teacher)
    edited = edited_config(config, recipe.target, recipe.target_args)
    cpu = torch.device("cpu")
    plan = plan_module.plan_memory(recipe, config, edited, cpu, Parallelism(), None)
    load = plan.loads[2]
    layers, batches = load.layers, micro_batches(load, 1)
    assert layers == config.num_hidden_layers >= 2 and load.gradient_checkpointing is False
    need = {(b, n): stage_bytes(plan.sizes, load, plan.layout, plan.wbytes, b, n)["total"] for b in batches for n in range(layers + 1)}
    gpu = (need[(1, 0)] + need[(1, 1)]) / 2  # one layer recomputed fits at one sequence, none does not
    want = next((b, n) for n in range(layers + 1) for b in batches if need[(b, n)] <= gpu)
    assert 0 < want[1] < layers
    fitted = plan_module.fit_stages(recipe, config, edited, cpu, Parallelism(), gpu)
    stage = fitted.stages[1]
    assert (stage.cfg.batch_size, stage.recomputed_layers, stage.cfg.gradient_checkpointing) == (*want, True)
    assert stage.cfg.batch_size * stage.cfg.grad_accum == recipe.stage2.batch_size * recipe.stage2.grad_accum
    student = types.SimpleNamespace()
    stage.train_mode(student)
    assert (student.gradient_checkpointing, student.checkpointed_layers, student.training) == (True, want[1], True)
    row = {"stage": 2, "memory": plan_module.fit_note(stage, fitted)}
    assert f"grad_accum {stage.cfg.grad_accum}, gradient checkpointing on the first {want[1]} of {layers} layers (the same" in fit_text(row)
    assert plan_module.fit_summary(stage, fitted)["recomputed_layers"] == want[1]
    # the recipe asking for it: every layer, at the largest micro-batch that fits so
    raw["stage2"]["gradient_checkpointing"] = True
    asked = parse_recipe(raw)
    stage = plan_module.fit_stages(asked, config, edited, cpu, Parallelism(), need[(1, layers)] * 1.001).stages[1]
    assert stage.cfg.gradient_checkpointing and stage.recomputed_layers in (None, layers)
    stage.train_mode(student)
    assert student.checkpointed_layers in (None, layers)


def test_a_recipe_that_fits_at_no_micro_batch_is_refused_before_training_in_one_line(tiny, monkeypatch, tmp_path):
    raw = tiny_raw(tiny["teacher"], tiny["docs"])
    monkeypatch.setattr(plan_module, "device_memory", lambda device: 0.5 * 1024**3)  # below the CUDA context alone
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    text = str(e.value)
    assert "\n" not in text and "stage 1 does not fit this GPU (0.5 GiB) at any micro-batch" in text
    assert "what would fit: a GPU of" in text and "stage1.seq_len" in text
    assert not (tmp_path / "run").exists()


def test_the_qwen3_8b_mla_dry_run_on_an_80_gib_gpu_shows_the_fitted_micro_batch(tiny, capsys):
    """The shipped recipe's stage 1 needs 95 GiB at 8 x 2048 on one GPU: the plan runs it at 4 x 4 (global batch 16);
    its stage 2, without gradient checkpointing, 97 GiB at 2 x 4096: the plan runs it at 1 x 32, still without."""
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "qwen3-8b-mla.yaml")
    sets = ["--set", f"teacher={ASSETS / 'qwen3-8b'}", "--set", f"data.files={tiny['docs']}"]
    assert main(["convert", recipe, *sets, "--dry-run", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "stage 1  4,000  4 x 4 x 2048" in out and "stage 2  4,000  1 x 32 x 4096" in out
    assert "stage 1 at the recipe's micro-batch of 8 needs 95" in out and "micro-batch 4 with grad_accum 4" in out
    assert "stage 2 at the recipe's micro-batch of 2 needs 97" in out and "micro-batch 1 with grad_accum 32" in out
    assert "gradient checkpointing" not in out.split("stage 2 at the recipe's")[1].splitlines()[0]
    assert main(["convert", recipe, *sets, "--dry-run", "--gpu-memory", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    first = plan["stages"][0]["memory"]
    assert first["adapted"] and (first["batch_size"], first["grad_accum"]) == (4, 4) and first["total"] <= 80 * 1024**3
    second = plan["stages"][1]["memory"]
    assert (second["batch_size"], second["grad_accum"], second["gradient_checkpointing"]) == (1, 32, False)


def test_gpu_memory_caps_the_fit_and_the_allocator_and_is_refused_where_it_cannot_hold(monkeypatch, capsys, tiny):
    """--gpu-memory on a run: the stages are fitted to the cap, not the card, and the allocator is capped to the same
    share; without a GPU, or above the card's memory, it is a one-line error and no run folder is made."""
    from attnedit.distributed import memory

    card, asked = 139.8 * 1024**3, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card / 2, int(card)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device=None: asked.append(fraction))
    monkeypatch.setattr(memory, "_cap_bytes", None)
    cuda = torch.device("cuda")
    assert memory.device_memory(cuda) == int(card)
    memory.cap_gpu_memory(79.2)
    assert memory.device_memory(cuda) == int(79.2 * 1024**3) and asked == [pytest.approx(79.2 * 1024**3 / card)]
    assert memory.device_memory(torch.device("cpu")) is None
    with pytest.raises(AttnEditError, match="not within this GPU's 139.80 GiB; give a size in GiB up to 139.8"):
        memory.cap_gpu_memory(200)
    # an H100 holds 79.18 GiB, which a user reads as 79.2: that size is the whole card, a larger one refused
    h100, asked[:] = 85017493504, []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (h100 / 2, h100))
    memory.cap_gpu_memory(79.2)
    assert memory.device_memory(cuda) == h100 and asked == [1.0]
    with pytest.raises(AttnEditError, match=r"--gpu-memory 79.3 is not within this GPU's 79.18 GiB; give a size in GiB up to 79.2$"):
        memory.cap_gpu_memory(79.3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "_cap_bytes", None)
    with pytest.raises(AttnEditError, match="this machine has none; use it with --dry-run"):
        memory.cap_gpu_memory(80)
    out = tiny["root"] / "capped-run"
    recipe = tiny["root"] / "capped.yaml"
    recipe.write_text(f"teacher: {tiny['teacher']}\ntarget: mla\ndata:\n  files: [{tiny['docs']}]\n")
    assert main(["convert", str(recipe), "--out", str(out), "--gpu-memory", "80"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory caps a GPU" in err and err.count("\n") == 1 and not out.exists()


def test_docs_scaling_md_is_what_its_generator_writes():
    """docs/scaling.md is tools/scaling_plan.py's output from the recipes, the memory model and the published runs'
    summaries: a change to any of them that leaves the page stale fails here (regenerate it with the command the
    generator's docstring gives)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "tools/scaling_plan.py"], cwd=root, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == (root / "docs" / "scaling.md").read_text(), "docs/scaling.md is stale: PYTHONPATH=. python tools/scaling_plan.py > docs/scaling.md"


def test_a_stage_that_runs_out_of_memory_says_in_one_line_how_to_go_on_and_resume_runs_it_smaller(tiny, monkeypatch):
    """The plan fitted stage 2 but the GPU ran out of memory in it (the plan fell short, as it did for a Qwen3-8B
    GateSWA whose attention ran unfused): one line with where it happened, what the plan expected, the
    ``--gpu-memory`` at which convert fits the next setting that needs less, and the resume command from the newest
    checkpoint (before: a traceback). Resumed with that memory, stage 2 runs at that setting and the run completes."""
    from attnedit.stages import stage2 as stage2_module

    raw = tiny_raw(tiny["teacher"], tiny["docs"], stage1__steps=2, stage2__steps=2, stage2__seq_len=64, heldout_eval=False)
    totals = _totals(raw)[2]
    gpu = 4 * totals[(4, False)]
    monkeypatch.setattr(plan_module, "device_memory", lambda device: gpu)
    # the next setting in convert's order (micro-batches largest first, then with checkpointing) that needs less
    order = [(b, gc) for gc in (False, True) for b in (4, 2, 1)]
    smaller = next(k for k in order[1:] if totals[k] < min(totals[j] for j in order[: order.index(k)]))
    real_loss = stage2_module.Stage2.loss

    def starved(self, ctx, group):
        def loss_fn(ids):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")

        return loss_fn

    monkeypatch.setattr(stage2_module.Stage2, "loss", starved)
    run = tiny["root"] / "starved"
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), run, progress="none")
    text = str(e.value)
    assert "\n" not in text, text
    assert text.startswith("stage 2 ran out of GPU memory at micro-batch 4 x 64 (CUDA out of memory. Tried to allocate 4.00 GiB.)"), text
    assert f"where the plan expected {totals[(4, False)] / 2**30:.1f} GiB of this GPU's {gpu / 2**30:.1f} GiB" in text
    newest = sorted((run / "checkpoints").glob("stage*.pt"))[-1].name
    assert f"its training up to checkpoint {newest} is kept: attnedit convert {run} --resume --gpu-memory " in text
    gib = float(text.split("--gpu-memory ")[1].split()[0])
    assert totals[smaller] <= gib * 2**30 < min(totals[j] for j in order[: order.index(smaller)])
    assert f"runs it at micro-batch {smaller[0]}, grad_accum {4 // smaller[0]}" in text

    monkeypatch.setattr(stage2_module.Stage2, "loss", real_loss)
    monkeypatch.setattr(plan_module, "device_memory", lambda device: gib * 2**30)  # what --gpu-memory sets
    summary = convert(parse_recipe(raw), run, resume=True, progress="none")
    assert summary["stage2"]["steps"] == 2 and (run / "model").is_dir()
    fitted = summary["stage2"]["fitted_to_gpu"]
    assert (fitted["batch_size"], bool(fitted.get("gradient_checkpointing"))) == smaller, fitted
