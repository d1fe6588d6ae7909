"""Quality evaluation: sliding-window perplexity against an independent loop, the lm-evaluation-harness
path on local task files with a saved edited model, and ``attnedit eval`` (JSON, table, bad input)."""

from __future__ import annotations

import copy
import json
import math
import statistics
import string

import pytest
import torch
from tiny import VOCAB, tiny_teacher

from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.eval.harness import HarnessSettings, run_harness
from attnedit.eval.perplexity import PerplexitySettings, perplexity, tokenize_text, wikitext2_text, windows
from attnedit.export import save_edited
from attnedit.surgery import edit_model

TEXT = (
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
    "video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in "
    "Japan , it is the third game in the Valkyria series . The game began development in 2010 , carrying over a "
    "large portion of the work done on Valkyria Chronicles II .\n"
)


def char_tokenizer():
    """A character-level tokenizer with the tiny models' 96-id vocabulary, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = (string.ascii_letters + string.digits + " .,;:!?'\"-()\n_/&%$=+*@")[: VOCAB - len(specials)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(chars))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def guide_perplexity(model, ids, max_length, stride):
    """The HF perplexity guide's loop (labels=, -100 masking), counting the scored tokens exactly."""
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            nll_sum += float(model(input_ids, labels=labels).loss) * n
        scored += n
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / scored), scored


def choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), as the harness's ``hf`` model scores a multiple-choice option: the
    continuation's tokens are those of context + continuation past the context's (no special tokens)."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = torch.tensor([tokenizer(context + continuation, add_special_tokens=False).input_ids])
    n = whole.shape[1] - len(ctx)
    with torch.no_grad():
        logp = model(whole[:, :-1]).logits.float().log_softmax(-1)[0, -n:]
    return float(logp.gather(-1, whole[0, -n:, None]).sum())


def task_docs(fewshot, task: str, limit: int) -> list[tuple[list[tuple[str, str]], list[str], int]]:
    """The first ``limit`` examples of a local task as (context/continuation pairs, choice texts, gold),
    written out from the harness's task definitions (0-shot, target delimiter " ")."""
    name = {"arc_easy": "arc_easy_test", "piqa": "piqa_validation", "winogrande": "winogrande_xl_validation"}[task]
    rows = [json.loads(line) for line in (fewshot / f"{name}.jsonl").read_text().splitlines()[:limit]]
    out = []
    for d in rows:
        if task == "arc_easy":
            out.append(([(f"Question: {d['question']}\nAnswer:", " " + c) for c in d["choices"]], d["choices"], int(d["gold"])))
        elif task == "piqa":
            choices = [d["sol1"], d["sol2"]]
            out.append(([(f"Question: {d['goal']}\nAnswer:", " " + c) for c in choices], choices, int(d["label"])))
        else:  # winogrande: the option fills the blank in the context, the rest of the sentence is scored
            blank = d["sentence"].index("_")
            contexts = [d["sentence"][:blank] + d[f"option{k}"] for k in (1, 2)]
            rest = " " + d["sentence"][blank + 1 :].strip()
            out.append(([(c, rest) for c in contexts], contexts, int(d["answer"]) - 1))
    return out


def expected_figures(model, tokenizer, fewshot, task: str, limit: int) -> dict:
    """acc, acc_norm (log-likelihood per character of the choice) and their stderr, computed here."""
    acc, acc_norm = [], []
    for pairs, texts, gold in task_docs(fewshot, task, limit):
        lls = [choice_logprob(model, tokenizer, c, x) for c, x in pairs]
        norm = [ll / len(t) for ll, t in zip(lls, texts)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
    stderr = lambda xs: statistics.stdev(xs) / math.sqrt(len(xs))  # noqa: E731  (the harness's mean_stderr)
    out = {"acc": statistics.mean(acc), "acc_stderr": stderr(acc)}
    if task != "winogrande":
        out.update(acc_norm=statistics.mean(acc_norm), acc_norm_stderr=stderr(acc_norm))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama teacher folder and a GateSWA model edited from it, both with the char tokenizer."""
    root = tmp_path_factory.mktemp("quality")
    teacher, tok = tiny_teacher("llama"), char_tokenizer()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = edit_model(teacher, "gateswa", {"window": 8, "full_layers": "every:2"})
    save_edited(student, root / "student", tok)
    return {"root": root, "teacher": teacher, "student": student, "tokenizer": tok}


@pytest.fixture(scope="module")
def small_data(shared_data, tmp_path_factory):
    """A data folder with the first 40 lines of WikiText-2 test (quick to tokenise) and the real fewshot/."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2-raw").mkdir()
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(lines[:40]), encoding="utf-8")
    (root / "fewshot").symlink_to(shared_data / "fewshot")
    return root


def test_windows_score_every_token_after_the_first_once():
    for n, length, stride in [(10, 4, 2), (11, 4, 3), (9, 4, 4), (3, 8, 4), (50, 16, 5)]:
        spans = windows(n, length, stride)
        scored = [t for b, e, k in spans for t in range(e - k, e)]
        assert all(e - b <= length and k < e - b for b, e, k in spans)
        if stride < length:
            assert scored == list(range(1, n))
        else:  # non-overlapping windows: each window's first token has no context (as in the guide)
            assert len(scored) == len(set(scored)) == n - math.ceil(n / stride)


@pytest.mark.parametrize("max_length,stride", [(64, 16), (64, 64), (512, 512), (48, 7)])
def test_teacher_perplexity_matches_the_guide_loop(models, max_length, stride):
    ids = tokenize_text(models["tokenizer"], TEXT)
    assert ids.shape[1] == len(TEXT)  # one id per character
    result = perplexity(models["teacher"], ids, PerplexitySettings(max_length, stride))
    ref, scored = guide_perplexity(models["teacher"], ids, max_length, stride)
    assert result.tokens == scored
    assert result.ppl == pytest.approx(ref, rel=1e-5)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-9)  # the nll reported is the one ppl comes from


def test_student_perplexity_matches_the_guide_loop_and_max_tokens_cuts(models):
    ids = tokenize_text(models["tokenizer"], TEXT, max_tokens=120)
    assert ids.shape[1] == 120
    result = perplexity(models["student"], ids, PerplexitySettings(32, 12))
    ref, scored = guide_perplexity(models["student"], ids, 32, 12)
    assert (result.tokens, result.ppl) == (119, pytest.approx(ref, rel=1e-5))
    assert scored == 119


def test_wikitext2_layout_and_missing_file(shared_data, tmp_path):
    text = wikitext2_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    # HF rows: "" for the blank first line, then " = Robert Boulter = \n", joined by "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n" + "\n\n" + "" + "\n\n" + " Robert Boulter is an English film")
    assert text.count("\n\n") >= 4357
    with pytest.raises(AttnEditError, match="--data-dir"):
        wikitext2_text(tmp_path / "wiki.test.raw")


def test_harness_runs_edited_checkpoint_on_local_tasks(models, shared_data):
    res = run_harness(str(models["root"] / "student"), ["arc_easy", "winogrande"], shared_data / "fewshot", HarnessSettings(limit=5, batch_size=4))
    # the harness ran the saved checkpoint; the same choices scored here with the in-memory model (on these
    # 5 ARC examples acc and acc_norm differ, and differ from the teacher's: 1/5 and 3/5 against 0/5 and 2/5)
    for task in ("arc_easy", "winogrande"):
        want = expected_figures(models["student"], models["tokenizer"], shared_data / "fewshot", task, 5)
        assert res[task] == pytest.approx(want, abs=1e-9), task


def test_eval_cli_student_vs_teacher_json(models, small_data, tmp_path, capsys):
    root = models["root"]
    save = tmp_path / "run" / "eval.json"
    args = [
        "eval",
        str(root / "student"),
        "--teacher",
        str(root / "teacher"),
        "--tasks",
        "wikitext2,piqa",
        "--limit",
        "2",
        "--ppl-tokens",
        "300",
        "--ppl-context",
        "64",
        "--ppl-stride",
        "32",
        "--data-dir",
        str(small_data),
        "--device",
        "cpu",
        "--json",
        "--save",
        str(save),
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(save.read_text())
    assert (printed["teacher"], printed["limit"], printed["perplexity"]["max_tokens"]) == (str(root / "teacher"), 2, 300)
    ppl = printed["tasks"]["wikitext2"]
    assert ppl["student"]["tokens"] == ppl["teacher"]["tokens"] == 299
    assert ppl["ratio"]["ppl"] == pytest.approx(ppl["student"]["ppl"] / ppl["teacher"]["ppl"])
    assert "tokens" not in ppl["ratio"]
    # the CLI's teacher figure is the same computation as a direct call on the same tokens
    ids = tokenize_text(models["tokenizer"], wikitext2_text(small_data / "wikitext-2-raw" / "wiki.test.raw"), 300)
    assert ppl["teacher"]["ppl"] == pytest.approx(perplexity(models["teacher"], ids, PerplexitySettings(64, 32)).ppl, rel=1e-5)
    piqa = printed["tasks"]["piqa"]
    for who in ("student", "teacher"):
        assert piqa[who] == pytest.approx(expected_figures(models[who], models["tokenizer"], small_data / "fewshot", "piqa", 2), abs=1e-9)
    assert set(piqa["ratio"]) <= {"acc", "acc_norm"}
    for metric, ratio in piqa["ratio"].items():
        assert ratio == pytest.approx(piqa["student"][metric] / piqa["teacher"][metric])


def test_eval_cli_table_without_teacher(models, small_data, capsys):
    args = ["eval", str(models["root"] / "student"), "--tasks", "wikitext2", "--ppl-tokens", "100", "--data-dir", str(small_data)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "metric", "student", "teacher", "student/teacher"]
    assert [line.split()[:2] for line in out[2:]] == [["wikitext2", "ppl"], ["wikitext2", "nll"], ["wikitext2", "tokens"]]
    assert all(line.split()[3:] == ["-", "-"] for line in out[2:])


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda root, tmp: [str(tmp), "--tasks", "wikitext2"], "not a model folder"),
        (
            lambda root, tmp: [str(root / "student"), "--tasks", "wikitext2,no_such_task_xyz"],
            "unknown task no_such_task_xyz; offline tasks: wikitext2, arc_easy",
        ),
        (lambda root, tmp: [str(root / "student"), "--tasks", "wikitext2", "--data-dir", str(tmp)], "WikiText-2 test file not found"),
        (lambda root, tmp: [str(root / "student"), "--tasks", "hellaswag", "--data-dir", str(tmp)], "task hellaswag needs"),
    ],
)
def test_eval_cli_bad_input_is_one_line(models, tmp_path, capsys, make_args, message):
    assert main(["eval", *make_args(models["root"], tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("attnedit: error: ") and message in err[-1]


@pytest.fixture(scope="module")
def bf16_student(models):
    """An MLA student (Qwen2 teacher) saved in bfloat16 from a teacher whose config says bfloat16 (a GPU conversion)."""
    teacher = tiny_teacher("qwen2").to(torch.bfloat16)
    teacher.config.dtype = torch.bfloat16
    out = models["root"] / "student-bf16"
    student = edit_model(teacher, "mla", {"init": "teacher"})
    save_edited(student, out, models["tokenizer"])
    return out, student


def test_eval_cli_loads_a_bf16_model_in_float32_and_back(bf16_student, models, small_data, capsys):
    # before the fix: "expected m1 and m2 to have the same dtype" (backbone bf16, attention fp32)
    folder, student = bf16_student
    ids = tokenize_text(models["tokenizer"], wikitext2_text(small_data / "wikitext-2-raw" / "wiki.test.raw"), 100)
    ppl = {}
    for dtype, rel in (("float32", 1e-5), ("bfloat16", 1e-3)):
        args = [
            "eval",
            str(folder),
            "--tasks",
            "wikitext2",
            "--ppl-tokens",
            "100",
            "--ppl-context",
            "32",
            "--ppl-stride",
            "32",
            "--data-dir",
            str(small_data),
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--json",
        ]
        assert main(args) == 0
        ppl[dtype] = json.loads(capsys.readouterr().out)["tasks"]["wikitext2"]["student"]["ppl"]
        # the saved bf16 weights, in memory, cast to the dtype asked for: the same figure
        want = perplexity(copy.deepcopy(student).to(getattr(torch, dtype)), ids, PerplexitySettings(32, 32)).ppl
        assert ppl[dtype] == pytest.approx(want, rel=rel), dtype
    assert ppl["float32"] != ppl["bfloat16"]  # the dtype asked for is the one that ran


def test_harness_loads_a_bf16_model_as_float32(bf16_student, models, shared_data):
    folder, student = bf16_student
    res = run_harness(str(folder), ["arc_easy"], shared_data / "fewshot", HarnessSettings(limit=2, batch_size=2, dtype="float32"))
    want = expected_figures(copy.deepcopy(student).float(), models["tokenizer"], shared_data / "fewshot", "arc_easy", 2)
    assert res["arc_easy"] == pytest.approx(want, abs=1e-9)


def test_eval_save_keeps_each_finished_figure_and_the_same_command_goes_on(models, small_data, tmp_path, capsys, monkeypatch):
    """attnedit eval --save FILE: each perplexity window and task of each model is kept in FILE's .progress.json as soon
    as it is done; after a stop (here: Ctrl-C after the student's first task) the same command measures only what is
    missing and gives the figures of an uninterrupted run; other settings do not reuse the kept figures."""
    from attnedit.eval import quality

    root = models["root"]
    args = ["eval", str(root / "student"), "--teacher", str(root / "teacher"), "--tasks", "wikitext2,piqa,arc_easy", "--limit", "2",
            "--ppl-tokens", "300", "--ppl-context", "64", "--data-dir", str(small_data), "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    save = tmp_path / "eval.json"
    real = quality.run_harness

    def stop_after_first(path, tasks, fewshot_dir, settings, on_task=None):
        def once(task, metrics):
            on_task(task, metrics)
            raise KeyboardInterrupt

        return real(path, tasks, fewshot_dir, settings, on_task=once)

    monkeypatch.setattr(quality, "run_harness", stop_after_first)
    assert main(args + ["--save", str(save)]) == 130
    capsys.readouterr()
    kept = json.loads((tmp_path / "eval.progress.json").read_text())
    assert (sorted(kept["pieces"]["student"]), sorted(kept["pieces"]["teacher"])) == (["piqa", "wikitext2"], ["wikitext2"]) and not save.exists()

    asked, measured = [], []
    monkeypatch.setattr(quality, "run_harness", lambda path, tasks, *a, **k: asked.append((path, tasks)) or real(path, tasks, *a, **k))
    monkeypatch.setattr(quality, "perplexity", lambda *a, **k: measured.append(1) or pytest.fail("measured again"))
    assert main(args + ["--save", str(save)]) == 0
    assert "3 figures kept from the stopped evaluation" in capsys.readouterr().err
    assert asked == [(str(root / "student"), ["arc_easy"]), (str(root / "teacher"), ["piqa", "arc_easy"])]
    assert json.loads(save.read_text())["tasks"] == whole["tasks"] and not (tmp_path / "eval.progress.json").exists()

    # a stopped run of other settings (here: fewer WikiText-2 tokens) is measured anew
    (tmp_path / "eval.progress.json").write_text(json.dumps(kept))
    monkeypatch.setattr(quality, "perplexity", perplexity)
    other = args[:]
    other[other.index("--ppl-tokens") + 1] = "200"
    assert main(other + ["--save", str(tmp_path / "other" / "eval.json")]) == 0
    assert "kept" not in capsys.readouterr().err
    assert main(other + ["--save", str(save), "--overwrite"]) == 0
    assert "kept" not in capsys.readouterr().err  # eval.progress.json was there, of the 300-token settings
    assert json.loads(save.read_text())["tasks"]["wikitext2"]["student"]["tokens"] == 199


def test_a_progress_file_attnedit_did_not_write_is_measured_anew(models, small_data, tmp_path):
    from attnedit.eval.quality import QualityRun, QualitySettings

    progress = tmp_path / "eval.progress.json"
    settings = QualitySettings(tasks=["wikitext2"], ppl_context=[64], ppl_tokens=300, data_dir=str(small_data))
    for junk in ("[1, 2]", "not json", json.dumps({"key": None, "pieces": {"student": {"wikitext2": {"ppl": 1.0}}}})):
        progress.write_text(junk)
        run = QualityRun(str(models["root"] / "student"), None, settings, progress=progress)
        assert run.kept() == [], junk
    run.perplexity()
    assert QualityRun(str(models["root"] / "student"), None, settings, progress=progress).kept() == ["student:wikitext2"]
