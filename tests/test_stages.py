"""Stage 1, stage 2 and `attnedit convert` on tiny random teachers (real data pipeline, tiny text)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, tiny_ids, tiny_teacher

from attnedit import AttnEditError
from attnedit.cli import main
from attnedit.recipe import parse_recipe
from attnedit.stages import convert, stage1, stage2
from attnedit.surgery import edit_model
from attnedit.targets import AttentionContext

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,;:'\"-()!?\n")
WORDS = "the of and to in a is was for on as with by he at from his an were are which this be has or had river city king".split()


# --------------------------------------------------------------------------- helpers the other test files use too


def char_tokenizer(extra: str = ""):
    """A real fast tokenizer with one token per character (fits the tiny teachers' 96-token vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + CHARS + list(extra))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def make_teacher_dir(root: Path, family: str = "llama") -> Path:
    out = root / f"teacher-{family}"
    if not out.exists():
        tiny_teacher(family).save_pretrained(out)
        char_tokenizer().save_pretrained(out)
    return out


def make_docs(path: Path, n: int = 300, seed: int = 0) -> Path:
    r = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(r.randint(20, 120))) + "."}) + "\n")
    return path


def tiny_raw(teacher: Path, docs: Path, **over) -> dict:
    """A recipe mapping for a few-second run on a tiny teacher."""
    raw = {
        "teacher": str(teacher),
        "target": "mla",
        "data": {"files": [str(docs)], "seq_len": 32, "heldout_blocks": 4, "shuffle_buffer": 16},
        "stage1": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup": 2},
        "stage2": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 2},
        "checkpoint_every": 2,
        "log_every": 1,
        "device": "cpu",
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return raw


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root), "docs": make_docs(root / "docs.jsonl"), "root": root}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- stage 1


def test_stage1_capture_is_the_teachers_attention_io():
    """Hooks capture each layer's normed attention input and output: an unedited layer reproduces it."""
    teacher = tiny_teacher("qwen3")
    student = edit_model(teacher, "mla", {"layers": "0"})
    ids = tiny_ids(2, 20)
    xs, ys = stage1.capture(teacher, [1, 2], ids)
    assert set(xs) == set(ys) == {1, 2}
    ctx = AttentionContext(torch.arange(20)[None].expand(2, 20), 0, 20, None, None)
    with torch.no_grad():
        for i in (1, 2):
            torch.testing.assert_close(student.attentions()[i](xs[i], ctx), ys[i], rtol=1e-5, atol=1e-5)


def _train(student, params, loss_fn, steps: int) -> tuple[list[float], dict]:
    """``steps`` AdamW steps of ``loss_fn`` on one tiny batch, training ``params`` alone; the losses and the last extras."""
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in params], lr=3e-3)
    ids = tiny_ids(4, 32)
    losses = []
    for _ in range(steps):
        loss, extras = loss_fn(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, extras


def test_stage1_lowers_its_loss_and_trains_only_new_attention():
    teacher = tiny_teacher("llama")
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    student = edit_model(teacher, "mla")
    params = stage1.trainable(student)
    assert params and all(".self_attn." in n for n, _ in params)
    losses, extras = _train(student, params, stage1.make_loss(teacher, student), steps=40)
    assert len(extras["layer_loss"]) == len(extras["layer_rel_err"]) == 4
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    for n, p in teacher.named_parameters():
        assert torch.equal(p, frozen[n]), n


# --------------------------------------------------------------------------- stage 2


def test_chunked_kd_terms_match_full_logits():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, VOCAB, bias=False), torch.nn.Linear(16, VOCAB, bias=False)
    h_s = torch.randn(2, 10, 16, requires_grad=True)
    h_t = torch.randn(2, 10, 16)
    ids = torch.randint(0, VOCAB, (2, 10))
    kl, ce, _ = stage2.kd_terms(h_s, h_t, ids, head_s, head_t, temperature=2.0, chunk=3)
    (kl + ce).backward()
    grad = h_s.grad.clone()
    h_s.grad = None
    zs, zt = head_s(h_s), head_t(h_t)
    ref_kl = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1), log_target=True, reduction="none").sum(-1).mean()
    ref_ce = torch.nn.functional.cross_entropy(zs[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (ref_kl + ref_ce).backward()
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(grad, h_s.grad)


def test_stage2_lowers_its_loss_with_features_and_ce():
    teacher = tiny_teacher("qwen3")
    student = edit_model(teacher, "gateswa", {"window": 8, "full_layers": "none"})
    cfg = parse_recipe({"stage2": {"ce_weight": 0.1, "feature_weight": 0.5, "kl_chunk": 16}}).stage2
    params = stage2.trainable(student, "attention")
    losses, extras = _train(student, params, stage2.make_loss(teacher, student, cfg), steps=30)
    assert {"kl", "ce", "teacher_ce", "feature"} <= set(extras)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("which", ["attention+norms", "all"])
def test_stage2_trains_copies_never_the_teacher(which):
    teacher = tiny_teacher("llama")
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    student = edit_model(teacher, "mla")
    stage2.unshare(student, teacher, which)
    params = stage2.trainable(student, which)
    names = [n for n, _ in params]
    assert any("input_layernorm" in n for n in names) and any(n == "model.norm.weight" for n in names)
    assert ("model.embed_tokens.weight" in names) == (which == "all")
    if which == "all":
        assert student.lm_head.weight is student.model.embed_tokens.weight  # the tie survives the copy
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    cfg = parse_recipe({}).stage2
    for _ in range(3):
        loss, _ = stage2.make_loss(teacher, student, cfg)(tiny_ids(2, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in teacher.named_parameters():
        assert torch.equal(p, frozen[n]), n
    assert not torch.equal(student.model.norm.weight, teacher.model.norm.weight)


# --------------------------------------------------------------------------- convert, end to end


@pytest.mark.slow
def test_convert_compiles_stage_2_under_gradient_checkpointing_and_says_each_stage_s_figures(assets, tmp_path, capsys):
    """Both Qwen3-8B recipes' stage 2 (compiled layers, gradient checkpointing) end to end on a tiny teacher: it
    trains, stays compiled, and each stage's end is a line in the log."""
    raw = tiny_raw(assets["teacher"], assets["docs"], stage1__steps=2, stage2__steps=2, checkpoint_every=100)
    raw["stage1"]["compile"] = "off"
    raw["stage2"].update(compile="on", gradient_checkpointing=True)
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="lines")
    assert summary["stage2"]["compiled"] is True
    err = capsys.readouterr().err
    assert "failed" not in err, err
    assert "attnedit: stage 1 done, " in err and "attnedit: stage 2 done, " in err and err.rstrip().count(", compiled") >= 1


def test_convert_runs_both_stages_and_saves_a_loadable_model(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = tiny_raw(assets["teacher"], assets["docs"], stage1__steps=20, stage2__steps=8, log_every=4)
    run = tmp_path / "run"
    summary = convert(parse_recipe(raw), run, progress="none")
    import yaml

    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))  # what it returned
    assert parse_recipe(yaml.safe_load((run / "recipe.yaml").read_text())) == parse_recipe(raw)  # what it ran
    from attnedit.distributed.checkpoint import list_checkpoints

    assert list_checkpoints(run)[-1].name == "stage2-step000008.pt"  # the last step was checkpointed
    rows = [m for m in metrics(run) if "step" in m]
    s1 = [m for m in rows if m["stage"] == 1]
    s2 = [m for m in rows if m["stage"] == 2]
    assert [m["step"] for m in s1] == [4, 8, 12, 16, 20] and [m["step"] for m in s2] == [4, 8]
    assert {"stage", "step", "tokens", "loss", "lr", "layer_loss", "layer_rel_err"} <= set(s1[0])
    assert s1[-1]["loss"] < 0.5 * s1[0]["loss"]
    assert s1[-1]["tokens"] == 20 * 4 * 32
    assert summary["stage1"]["tokens"] == 20 * 4 * 32 and summary["stage2"]["tokens"] == 8 * 4 * 32
    assert summary["heldout_after"]["kl"] < summary["heldout_before"]["kl"]
    model = AutoModelForCausalLM.from_pretrained(run / "model", trust_remote_code=True)
    assert model.config.edit["target"] == "mla"
    out = model.generate(tiny_ids(1, 8), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_stage2_only_is_one_flag(assets, tmp_path):
    raw = tiny_raw(assets["teacher"], assets["docs"], stage1__steps=0, target="gateswa", heldout_eval=False)
    raw["target_args"] = {"window": 8, "full_layers": "every:2"}
    raw["stage2"].update(grad_accum=2, precision="bf16")  # accumulation and the autocast path, on CPU
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    assert "stage1" not in summary and summary["stage2"]["steps"] == 6
    assert summary["stage2"]["tokens"] == 6 * 4 * 2 * 32 == metrics(tmp_path / "run")[-1]["tokens"]
    assert {m["stage"] for m in metrics(tmp_path / "run")} == {2}


def test_a_student_trained_on_longer_sequences_is_also_measured_on_long_held_out_blocks(assets, tmp_path):
    """Stage 2 trains on 128 tokens, the held-out blocks are 32: the same held-out text is also measured in 128-token
    blocks (one block: the 4 x 32 tokens), before and after training, and printed next to the short figures."""
    from attnedit.stages import format_summary

    raw = tiny_raw(assets["teacher"], assets["docs"], stage1__steps=2, stage2__steps=2, target="gateswa")
    raw["target_args"] = {"window": 24, "sink": 2, "full_layers": "every:2"}
    raw["stage2"].update(seq_len=128, batch_size=1)
    summary = convert(parse_recipe(raw), tmp_path / "run", progress="none")
    for when in ("before", "after"):
        short, long = summary[f"heldout_{when}"], summary[f"heldout_{when}_long"]
        assert short["seq_len"] == 32 and long["seq_len"] == 128 and short["kl"] != long["kl"]
    text = format_summary(summary, tmp_path / "run")
    assert "(32-token blocks)" in text and "(128-token blocks)" in text
    assert text.endswith(f"model saved to {tmp_path / 'run' / 'model'}")  # summary.json keeps "model", relative
    card = (tmp_path / "run" / "model" / "README.md").read_text()  # the model card: the long blocks' KL, before and after
    before, after = summary["heldout_before_long"]["kl"], summary["heldout_after_long"]["kl"]
    assert f"| KL(teacher ‖ model), 128-token blocks | {before:,.4g} | {after:,.4g} |" in card
    raw["stage2"].update(seq_len=32)  # no stage longer than the held-out blocks: no long figures
    summary = convert(parse_recipe(raw), tmp_path / "short", progress="none")
    assert "heldout_before_long" not in summary and "heldout_after_long" not in summary


@pytest.mark.parametrize("long_after, warned", [(0.5, False), (0.9, True)])
def test_the_heldout_warning_reads_the_long_blocks_where_the_run_has_them(long_after, warned):
    """A windowed student is nearly exact on short blocks at its start, so its short-block KL may rise while its
    long-block KL falls: the warning follows the long blocks, the length the run trains at."""
    from attnedit.results import Summary
    from attnedit.stages import format_summary

    ce = {"student_ce": 3.0, "teacher_ce": 2.0}
    summary = {
        "heldout_before": {"kl": 0.005, **ce, "seq_len": 1024}, "heldout_after": {"kl": 0.018, **ce, "seq_len": 1024},
        "heldout_before_long": {"kl": 0.8, **ce, "seq_len": 8192}, "heldout_after_long": {"kl": long_after, **ce, "seq_len": 8192},
        "wall_s": 1, "model": "m",
    }  # fmt: skip
    assert (Summary(**summary).regression() is not None) is warned
    assert ("warning: training raised the held-out KL from 0.8 to 0.9" in format_summary(summary)) is warned
    del summary["heldout_before_long"], summary["heldout_after_long"]  # without them, the short blocks decide
    assert "warning: training raised the held-out KL from 0.005 to 0.018" in format_summary(summary)


def test_dry_run_prints_the_plan(assets, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_raw(assets["teacher"], assets["docs"])))
    assert main(["convert", str(recipe), "--dry-run", "--set", "target_args.layers=1-3", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    for text in ("edited layers    1-3 (3 of 4)", "new params", "stage 1", "stage 2", "est. memory", "768"):
        assert text in out, text
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- bad input


def _error(tmp_path, raw) -> str:
    with pytest.raises(AttnEditError) as e:
        convert(parse_recipe(raw), tmp_path / "run", progress="none")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_give_one_line_errors(assets, tmp_path):
    teacher, docs = assets["teacher"], assets["docs"]
    msg = _error(tmp_path / "a", tiny_raw(teacher, docs, data__seq_len=1024))
    assert "max_position_embeddings 512" in msg
    other = tmp_path / "other-tok"
    char_tokenizer(extra="@#").save_pretrained(other)
    msg = _error(tmp_path / "b", tiny_raw(teacher, docs, data__tokenizer=str(other)))
    assert "does not match the teacher" in msg
    msg = _error(tmp_path / "c", tiny_raw(teacher, tmp_path / "missing.jsonl"))
    assert "does not exist" in msg
    (tmp_path / "empty.jsonl").write_text("")
    _error(tmp_path / "d", tiny_raw(teacher, tmp_path / "empty.jsonl"))
    run = tmp_path / "e"
    run.mkdir()
    (run / "x").write_text("")
    with pytest.raises(AttnEditError, match="already exists; continue it with --resume"):
        convert(parse_recipe(tiny_raw(teacher, docs)), run, progress="none")


def test_recall_fraction_sets_stage_2s_data_mix_only(assets):
    """stage2.recall_fraction puts recall spans into stage 2's batches; stage 1 reads plain blocks."""
    from attnedit.distributed import Parallelism
    from attnedit.stages.context import edit
    from attnedit.stages.plan import stages

    recipe = parse_recipe(tiny_raw(assets["teacher"], assets["docs"], stage2__recall_fraction=1.0, stage2__seq_len=96))
    ctx, _ = edit(recipe, torch.device("cpu"), assets["root"] / "unused", Parallelism())
    jobs = {stage.number: stage.job(ctx) for stage in stages(recipe)}
    assert jobs[1].stream.transform is None
    ids = jobs[2].stream.next_batch(4)
    assert ids.shape == (4, 96) and jobs[2].stream.transform(ids.new_zeros(1, 96)).shape == (1, 96)
    assert all(any(torch.equal(row[i : i + 32], row[j : j + 32]) for i in range(64) for j in range(i + 32, 65)) for row in ids)
    for job in jobs.values():
        job.stream.close()
    with pytest.raises(AttnEditError, match="recall_fraction"):
        parse_recipe(tiny_raw(assets["teacher"], assets["docs"], stage2__recall_fraction=1.5))
    from attnedit.stages.plan import make_plan

    assert make_plan(recipe)["recall_fraction"] == 1.0
    short = parse_recipe(tiny_raw(assets["teacher"], assets["docs"], stage2__recall_fraction=1.0))  # 32-token blocks
    assert make_plan(short)["recall_fraction"] == 0.0  # too short for a span: the plan does not promise one
