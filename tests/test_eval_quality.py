"""Quality evaluation: sliding-window perplexity against an independent loop, the lm-evaluation-harness
path on local task files with a saved edited model, and ``attnedit eval`` (JSON, table, bad input)."""

from __future__ import annotations

import json
import math
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
    assert 1 < result.ppl < 2 * VOCAB  # a random tiny model is near uniform, not degenerate


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
    res = run_harness(
        str(models["root"] / "student"), ["arc_easy", "winogrande"], shared_data / "fewshot", HarnessSettings(limit=3, batch_size=4)
    )
    assert set(res["arc_easy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(res["winogrande"]) == {"acc", "acc_stderr"}
    for figures in res.values():
        assert figures["acc"] in {0.0, 1 / 3, 2 / 3, 1.0}  # 3 examples
        assert 0 <= figures["acc_stderr"] <= 0.5


def test_eval_cli_student_vs_teacher_json(models, small_data, tmp_path, capsys):
    root = models["root"]
    save = tmp_path / "run" / "eval.json"
    args = ["eval", str(root / "student"), "--teacher", str(root / "teacher"), "--tasks", "wikitext2,piqa", "--limit", "2",
            "--ppl-tokens", "300", "--ppl-context", "64", "--ppl-stride", "32", "--data-dir", str(small_data),
            "--device", "cpu", "--json", "--save", str(save)]
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
    assert set(piqa["student"]) == set(piqa["teacher"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(piqa["ratio"]) <= {"acc", "acc_norm"}


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
        (lambda root, tmp: [str(root / "student"), "--tasks", "wikitext2,no_such_task_xyz"], "unknown task no_such_task_xyz; offline tasks: wikitext2, arc_easy"),
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
    save_edited(edit_model(teacher, "mla", {"init": "teacher"}), out, models["tokenizer"])
    return out


def test_eval_cli_loads_a_bf16_model_in_float32_and_back(bf16_student, small_data, capsys):
    # before the fix: "expected m1 and m2 to have the same dtype" (backbone bf16, attention fp32)
    for dtype in ("float32", "bfloat16"):
        args = ["eval", str(bf16_student), "--tasks", "wikitext2", "--ppl-tokens", "100", "--ppl-context", "32",
                "--ppl-stride", "32", "--data-dir", str(small_data), "--device", "cpu", "--dtype", dtype, "--json"]
        assert main(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert math.isfinite(out["tasks"]["wikitext2"]["student"]["ppl"])


def test_harness_loads_a_bf16_model_as_float32(bf16_student, shared_data):
    res = run_harness(str(bf16_student), ["arc_easy"], shared_data / "fewshot", HarnessSettings(limit=2, batch_size=2, dtype="float32"))
    assert 0 <= res["arc_easy"]["acc"] <= 1
