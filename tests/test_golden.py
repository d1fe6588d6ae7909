"""Golden values: a short CPU ``convert`` on a tiny teacher logs exactly the losses it logged when recorded.

Every other training test checks a direction (the loss goes down, 1 process = 2 processes, resume = no resume);
these fail when the numbers themselves move: a changed loss term, normalisation, temperature, initialisation,
learning-rate schedule, data order or held-out split.

Where the values come from: ``python -m pytest tests/test_golden.py`` was run with ``ATTNEDIT_GOLDEN_PRINT=1``
(which prints the observed values) at the commit that added this file (torch 2.x, CPU, fp32); two runs, with 1
and 2 threads, printed bit-identical values. To re-record after an intended change of the math, run that and
paste the printout into GOLDEN below, and say in the commit message why the numbers moved.

Tolerance: rel 1e-4 (abs 2e-6 for figures the run folder rounds to 6 decimals). The run is fp32 on the CPU
and seeded, so on this machine it is bit-for-bit repeatable; another CPU or BLAS build may sum in another order
(~1e-7 relative per operation, a little more after three optimizer steps), which 1e-4 covers with a wide
margin. A change of the math moves these figures far more: when recording, a 1% change of stage 1's learning
rate alone moved stage 1's step-2 and step-3 losses by 4e-4 and 1.3e-3 relative and stage 2's KL by 0.4-0.7%;
a changed loss term or initialisation moves the step-1 figures, which no optimizer step has touched yet.

The teacher is built here, its weights drawn from a seeded generator, so the values do not depend on how
transformers initialises a fresh model (which changes between its versions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from test_stages import char_tokenizer, make_docs, metrics, tiny_raw
from tiny import COMMON

from attnedit.cli import main

PRINT = bool(os.environ.get("ATTNEDIT_GOLDEN_PRINT"))
RTOL, ATOL = 1e-4, 2e-6
KEYS = ("loss", "kl", "ce", "teacher_ce", "grad_norm", "layer_loss", "layer_rel_err")
HELDOUT = ("kl", "student_ce", "teacher_ce")

# recorded as the module docstring says; target -> {"steps": [(stage, step, {key: value})], held-out before/after}
GOLDEN: dict = {
    "mla": {
        "steps": [
            (
                1,
                1,
                {
                    "loss": 4.072783470153809,
                    "grad_norm": 1.8288830518722534,
                    "layer_loss": [1.019945, 1.012685, 1.023947, 1.016207],
                    "layer_rel_err": [0.999797, 1.005976, 1.002776, 1.007903],
                },
            ),
            (
                1,
                2,
                {
                    "loss": 3.9109532833099365,
                    "grad_norm": 2.2601943016052246,
                    "layer_loss": [0.964846, 0.946352, 1.001203, 0.998552],
                    "layer_rel_err": [0.980682, 0.963912, 0.991366, 0.993549],
                },
            ),
            (
                1,
                3,
                {
                    "loss": 3.5740151405334473,
                    "grad_norm": 2.3858554363250732,
                    "layer_loss": [0.885786, 0.827641, 0.932175, 0.928413],
                    "layer_rel_err": [0.935864, 0.907815, 0.963285, 0.963556],
                },
            ),
            (
                2,
                1,
                {
                    "loss": 2.4749903678894043,
                    "kl": 0.10620894283056259,
                    "ce": 4.737562656402588,
                    "teacher_ce": 4.742220401763916,
                    "grad_norm": 1.0149468183517456,
                },
            ),
            (
                2,
                2,
                {
                    "loss": 2.436063528060913,
                    "kl": 0.11961498111486435,
                    "ce": 4.632896900177002,
                    "teacher_ce": 4.720825672149658,
                    "grad_norm": 0.9752019643783569,
                },
            ),
            (
                2,
                3,
                {
                    "loss": 2.3959884643554688,
                    "kl": 0.11515773832798004,
                    "ce": 4.561661243438721,
                    "teacher_ce": 4.7160444259643555,
                    "grad_norm": 1.0533554553985596,
                },
            ),
        ],
        "heldout_before": {"kl": 0.165447, "student_ce": 4.72266, "teacher_ce": 4.711428},
        "heldout_after": {"kl": 0.117978, "student_ce": 4.468744, "teacher_ce": 4.711428},
    },
    "gateswa": {
        "steps": [
            (
                1,
                1,
                {
                    "loss": 4.117405891418457,
                    "grad_norm": 3.08906626701355,
                    "layer_loss": [1.06867, 0.99619, 1.054479, 0.998067],
                    "layer_rel_err": [1.0234, 0.99775, 1.017617, 0.998867],
                },
            ),
            (
                1,
                2,
                {
                    "loss": 3.8087267875671387,
                    "grad_norm": 3.437058687210083,
                    "layer_loss": [0.931586, 0.963702, 0.950528, 0.962911],
                    "layer_rel_err": [0.963631, 0.972708, 0.965952, 0.975657],
                },
            ),
            (
                1,
                3,
                {
                    "loss": 3.3457119464874268,
                    "grad_norm": 3.220958948135376,
                    "layer_loss": [0.859523, 0.782489, 0.857968, 0.845732],
                    "layer_rel_err": [0.921886, 0.882705, 0.924148, 0.919651],
                },
            ),
            (
                2,
                1,
                {
                    "loss": 2.4601213932037354,
                    "kl": 0.09081763029098511,
                    "ce": 4.738607406616211,
                    "teacher_ce": 4.742220401763916,
                    "grad_norm": 1.467282772064209,
                },
            ),
            (
                2,
                2,
                {
                    "loss": 2.4081242084503174,
                    "kl": 0.10646875947713852,
                    "ce": 4.603311061859131,
                    "teacher_ce": 4.720825672149658,
                    "grad_norm": 1.3860224485397339,
                },
            ),
            (
                2,
                3,
                {
                    "loss": 2.3480021953582764,
                    "kl": 0.10266703367233276,
                    "ce": 4.490670204162598,
                    "teacher_ce": 4.7160444259643555,
                    "grad_norm": 1.457877516746521,
                },
            ),
        ],
        "heldout_before": {"kl": 0.15873, "student_ce": 4.753128, "teacher_ce": 4.711428},
        "heldout_after": {"kl": 0.112818, "student_ce": 4.325597, "teacher_ce": 4.711428},
    },
}


def golden_teacher(root: Path) -> Path:
    """A tiny Llama whose every weight comes from one seeded generator (norms near 1, the rest N(0, 0.05))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "teacher"
    model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return golden_teacher(root), make_docs(root / "docs.jsonl")


def _observed(run: Path) -> dict:
    steps = [(r["stage"], r["step"], {k: r[k] for k in KEYS if k in r}) for r in metrics(run) if "loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    return {"steps": steps, **{k: {x: summary[k][x] for x in HELDOUT} for k in ("heldout_before", "heldout_after")}}


def _close(got, want, where: str) -> None:
    if isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    else:
        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), where


@pytest.mark.parametrize(
    "target,args",
    [("mla", {"kv_lora_rank": 16, "q_lora_rank": 16}), ("gateswa", {"window": 8, "full_layers": "every:2"})],
)
def test_first_steps_log_the_recorded_losses(assets, tmp_path, capsys, monkeypatch, target, args):
    teacher, docs = assets
    raw = tiny_raw(teacher, docs, target=target, stage1__steps=3, stage2__steps=3, log_every=1, checkpoint_every=100)
    raw["target_args"] = args
    raw["stage2"].update(ce_weight=0.5)  # so stage 2's loss mixes two terms, each checked on its own too
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "recipe.yaml", "--out", "run", "--progress", "none"]) == 0, capsys.readouterr().err
    got = _observed(tmp_path / "run")
    if PRINT or target not in GOLDEN:
        with capsys.disabled():
            print(f"\n{target!r}: {got!r},")
    want = GOLDEN[target]
    assert [s[:2] for s in got["steps"]] == [s[:2] for s in want["steps"]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    for (stage, step, values), (_, _, ref) in zip(got["steps"], want["steps"]):
        assert values.keys() == ref.keys(), (stage, step)
        for key in ref:
            _close(values[key], ref[key], f"stage {stage} step {step} {key}")
    for when in ("heldout_before", "heldout_after"):
        for key in HELDOUT:
            _close(got[when][key], want[when][key], f"{when} {key}")
