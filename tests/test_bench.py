"""attnedit bench and passkey on tiny models (CPU): KV bytes measured == analytic, OOM handling, grids, CLI."""

import json

import pytest
import torch
from tiny import tiny_teacher
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from attnedit import profiling
from attnedit.cli.main import main
from attnedit.errors import AttnEditError
from attnedit.eval import bench
from attnedit.eval.bench import BenchSettings, engines, format_bench, largest_fit, run_bench, runner
from attnedit.eval.passkey import (
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    answer_is,
    passkey_prompt,
    run_passkey,
)
from attnedit.export import save_edited
from attnedit.surgery import edit_model

GATESWA = {"window": 8, "sink": 2, "full_layers": "every:2"}
SMALL = BenchSettings(contexts=[6, 24], batches=[1, 2], decode_tokens=3, repeats=1, warmup=0)
QUICK = ["--batches", "1,2", "--decode-tokens", "2", "--repeats", "1", "--warmup", "0"]  # the smallest timing a CLI test runs


def char_tokenizer():
    """A character-level tokenizer built offline, small enough for the tiny models' 96-token vocabulary."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzTGFIHWR0123456789 .?\n"))
    vocab = {"<unk>": 0, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_teacher("qwen3")
    return edit_model(teacher, "gateswa", GATESWA), teacher


@pytest.mark.parametrize("target,args", [("gateswa", GATESWA), ("mla", {"kv_lora_rank": 24})])
def test_measured_kv_equals_analytic(target, args):
    teacher = tiny_teacher("llama")
    student = edit_model(teacher, target, args)
    result = run_bench(student, teacher, SMALL, "float32", log=lambda _: None)
    assert [(r["batch"], r["context"]) for r in result["runs"]] == [(1, 6), (2, 6), (1, 24), (2, 24)]
    for r in result["runs"]:
        for name in ("student", "teacher"):
            f = r[name]
            assert f["kv_bytes_measured"] == f["kv_bytes_analytic"] > 0
            assert f["ttft_ms"] > 0 and f["decode_tok_s"] > 0 and f["peak_mem_bytes"] is None
            assert f["bytes_per_step"] > f["kv_bytes_analytic"] and f["hbm_bound_ms"] is None  # no bandwidth on CPU
        stock = r["teacher_stock"]
        assert stock["decode_tok_s"] > 0 and stock["ttft_ms"] > 0 and r["ratio_stock"]["decode_tok_s"] > 0
        # the edited cache is smaller than the teacher's, except a window longer than the context
        assert r["ratio"]["kv_bytes_measured"] < 1
    teacher_per_token = 2 * 4 * 2 * 16 * 4  # 2 (K,V) * layers * kv heads * head dim * fp32 bytes
    assert result["kv"]["teacher"]["bytes_per_token"] == [teacher_per_token] * 2
    json.dumps(result)  # the bench.json layout is plain JSON


def test_sliding_cache_stays_bounded(pair):
    student, teacher = pair
    long = run_bench(student, teacher, BenchSettings([48], [1], 2, 1, 0), "float32", log=lambda _: None)["runs"][0]
    short = run_bench(student, teacher, BenchSettings([24], [1], 2, 1, 0), "float32", log=lambda _: None)["runs"][0]
    # two sliding layers hold window + sink = 10 tokens whatever the context; two full layers grow
    growth = long["student"]["kv_bytes_measured"] - short["student"]["kv_bytes_measured"]
    assert growth == 2 * 2 * 2 * 16 * 4 * 24  # full layers * (K,V) * kv heads * head dim * 4 bytes * 24 tokens
    assert long["teacher"]["kv_bytes_measured"] - short["teacher"]["kv_bytes_measured"] == 4 * 2 * 2 * 16 * 4 * 24


def test_largest_fit_searches_downward():
    assert largest_fit(lambda b: b <= 5, 64) == 5
    assert largest_fit(lambda b: b <= 5, 6) == 5
    assert largest_fit(lambda b: b <= 40, 64) == 40
    assert largest_fit(lambda b: False, 8) == 0


def test_batch_that_does_not_fit_reports_largest(pair, monkeypatch):
    student, teacher = pair
    real = runner.run_once

    def limited(engine, batch, *args, **kwargs):
        if batch > (3 if engine.model is student else 5):
            raise torch.OutOfMemoryError("simulated")
        return real(engine, batch, *args, **kwargs)

    monkeypatch.setattr(runner, "run_once", limited)
    lines = []
    result = run_bench(student, teacher, BenchSettings([8], [2, 8, 16], 2, 1, 0), "float32", log=lines.append)
    fit, big, bigger = result["runs"]
    assert fit["student"] and fit["teacher"] and "largest_batch" not in fit
    expected = {"student": 3, "teacher": 5, "teacher_stock": 5}
    assert big["student"] is None and big["teacher"] is None and big["largest_batch"] == expected
    assert bigger["largest_batch"] == expected and bigger["ratio"]["decode_tok_s"] is None
    assert any("the largest that fits is 3" in line for line in lines)
    assert "largest that fits: 5" in format_bench(result)


CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"


def test_a_cpu_out_of_memory_counts_as_not_fitting(pair, monkeypatch):
    student, teacher = pair
    real = runner.run_once

    def limited(model, batch, *args, **kwargs):
        if batch > 2:
            raise RuntimeError(CPU_OOM)  # what torch's CPU allocator raises (before: a traceback)
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(runner, "run_once", limited)
    result = run_bench(student, teacher, BenchSettings([8], [4], 2, 1, 0), "float32", log=lambda _: None)
    assert result["runs"][0]["largest_batch"] == {"student": 2, "teacher": 2, "teacher_stock": 2}
    monkeypatch.setattr(runner, "run_once", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("some other bug")))
    with pytest.raises(RuntimeError, match="some other bug"):  # only out-of-memory is swallowed
        run_bench(student, teacher, BenchSettings([8], [4], 2, 1, 0), "float32", log=lambda _: None)


def test_passkey_out_of_memory_is_one_line(pair, monkeypatch):
    from attnedit.eval import passkey

    student, _ = pair
    monkeypatch.setattr(passkey, "generate_greedy", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(CPU_OOM)))
    with pytest.raises(AttnEditError, match="ran out of memory at context 240") as e:
        run_passkey({"student": student}, char_tokenizer(), [240], [0.5], 2, log=lambda _: None)
    assert "\n" not in str(e.value)


def test_bad_requests(pair):
    student, teacher = pair
    with pytest.raises(AttnEditError, match="longer than the student supports"):
        run_bench(student, teacher, BenchSettings([1024], [1], 2), "float32")
    with pytest.raises(AttnEditError, match="not an edited"):
        run_bench(teacher, teacher, SMALL, "float32")
    with pytest.raises(AttnEditError, match="positive integers"):
        BenchSettings([0], [1])


# ---------------------------------------------------------------------------------------------- passkey


def test_passkey_prompt_has_exact_length_and_depth():
    tok = char_tokenizer()  # one token per character
    n_fill = 400 - len(INSTRUCTION) - len(NEEDLE.format(key="12345")) - len(QUESTION)
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tok, 400, depth, "12345")
        text = tok.decode(ids)
        assert len(ids) == 400 and text.count("12345") == 2
        assert text.startswith(INSTRUCTION) and text.endswith(QUESTION)
        assert text.index("The pass key") == len(INSTRUCTION) + round(depth * n_fill)
    with pytest.raises(AttnEditError, match="too short"):
        passkey_prompt(tok, 50, 0.5, "12345")
    with pytest.raises(AttnEditError, match="outside 0..1"):
        passkey_prompt(tok, 400, 1.5, "12345")


def test_varied_filler_gives_each_trial_its_own_text_of_the_same_sentences():
    from attnedit.eval.passkey import FILLER, PasskeySettings, filler_tokens

    tok = char_tokenizer()
    sentences = {x.strip() for x in FILLER.split(".") if x.strip()}
    prompts = {seed: passkey_prompt(tok, 400, 0.5, "12345", order_seed=seed) for seed in (0, 1, 2)}
    for seed, ids in prompts.items():
        text = tok.decode(ids)
        assert len(ids) == 400 and text.count("12345") == 2 and text.startswith(INSTRUCTION) and text.endswith(QUESTION)
        body = text[len(INSTRUCTION) : -len(QUESTION)].replace(NEEDLE.format(key="12345"), "")  # cut mid-sentence
        assert {x.strip() for x in body.split(".")[1:-1] if x.strip()} <= sentences  # whole sentences, only FILLER's
        assert ids == passkey_prompt(tok, 400, 0.5, "12345", order_seed=seed)  # a seed is one text
    assert len({tuple(p) for p in prompts.values()}) == 3  # each seed its own order
    assert tok.decode(filler_tokens(tok, 200)) == (FILLER * 3)[:200]  # 'same' is the classic repeated filler
    with pytest.raises(AttnEditError, match="filler"):
        PasskeySettings(filler="shuffled")


def test_answer_parsing():
    assert answer_is(" 12345. Remember", "12345")
    assert not answer_is(" 1234 5", "12345") and not answer_is(" none", "12345") and not answer_is("123456", "12345")


def test_passkey_grid(pair):
    student, teacher = pair
    result = run_passkey({"student": student, "teacher": teacher}, char_tokenizer(), [240, 300], [0.0, 0.5, 1.0], 3, log=lambda _: None)
    for name in ("student", "teacher"):
        grid = result[name]
        assert len(grid) == 2 and all(len(row) == 3 for row in grid)
        assert all(a * 3 in (0, 1, 2, 3) for row in grid for a in row)
    assert json.loads(json.dumps(result))["trials"] == 3 and result["filler"] == "same"
    varied = run_passkey({"teacher": teacher}, char_tokenizer(), [240], [0.0, 1.0], 3, log=lambda _: None, filler="varied")
    assert varied["filler"] == "varied" and len(varied["teacher"][0]) == 2
    with pytest.raises(AttnEditError, match="filler"):
        run_passkey({"teacher": teacher}, char_tokenizer(), [240], [0.5], 1, filler="other")
    with pytest.raises(AttnEditError, match="longer than"):
        run_passkey({"student": student}, char_tokenizer(), [4096], [0.5], 1)


# -------------------------------------------------------------------------------------------------- CLI


def test_bench_cli_writes_json_and_passkey(pair, tmp_path, capsys):
    student, teacher = pair
    save_edited(student, tmp_path / "student", char_tokenizer())
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run" / "bench.json"
    common = [str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--device", "cpu"]
    args = [
        "bench",
        *common,
        "--contexts",
        "240",
        *QUICK,
    ]
    assert main([*args, "--save", str(out), "--passkey"]) == 0
    saved = json.loads(out.read_text())
    assert saved["teacher"] == str(tmp_path / "teacher") and saved["dtype"] == "float32"
    assert all(r[n]["kv_bytes_measured"] == r[n]["kv_bytes_analytic"] for r in saved["runs"] for n in ("student", "teacher"))
    assert all(r["teacher_stock"]["decode_tok_s"] > 0 for r in saved["runs"])
    passkey = json.loads((out.parent / "passkey.json").read_text())
    assert passkey["contexts"] == [240] and len(passkey["student"][0]) == len(passkey["depths"])
    assert "tok/s S" in capsys.readouterr().out

    assert main(["bench", *common, "--contexts", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnedit: error: context 4096 is longer than") and "\n" not in err
    saved_pk = tmp_path / "run" / "passkey-alone.json"
    assert main(["passkey", *common, "--contexts", "240", "--depths", "0.5", "--save", str(saved_pk)]) == 0
    alone = json.loads(saved_pk.read_text())
    assert alone["contexts"] == [240] and alone["depths"] == [0.5] and alone["model"] == str(tmp_path / "student")
    capsys.readouterr()
    assert main(["passkey", str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher"), "--contexts", "240"]) == 2
    assert "not an edited model" in capsys.readouterr().err


def test_several_students_share_one_timing_of_the_teacher(tmp_path, capsys, monkeypatch):
    """bench MODEL MODEL: each student gets its own bench JSON, with the same teacher figures (timed once)."""
    teacher = tiny_teacher("llama")
    for name, target, args in (("gs", "gateswa", GATESWA), ("mla", "mla", {"kv_lora_rank": 24})):
        save_edited(edit_model(teacher, target, args), tmp_path / name / "model", char_tokenizer())
    teacher.save_pretrained(tmp_path / "teacher")
    calls = []
    real = runner.run_once
    monkeypatch.setattr(runner, "run_once", lambda engine, *a: calls.append(engine) or real(engine, *a))
    models = [str(tmp_path / "gs" / "model"), str(tmp_path / "mla" / "model")]
    cli = [
        "bench",
        *models,
        "--teacher",
        str(tmp_path / "teacher"),
        "--device",
        "cpu",
        "--contexts",
        "16",
        *QUICK,
        "--no-stock",
    ]
    assert main([*cli, "--save", str(tmp_path / "bench.json")]) == 0
    # 2 cells x (2 students + the teacher once), not 2 x (student + teacher)
    assert len(calls) == 6
    gs, mla = (json.loads((tmp_path / f"bench-{n}.json").read_text()) for n in ("gs", "mla"))
    assert gs["model"] == models[0] and mla["model"] == models[1] and gs["benched_with"] == [models[1]]
    for a, b in zip(gs["runs"], mla["runs"]):
        assert a["teacher"] == b["teacher"] and a["student"] != b["student"]
        assert a["ratio"]["decode_tok_s"] == a["student"]["decode_tok_s"] / a["teacher"]["decode_tok_s"]
    assert gs["kv"]["student"] != mla["kv"]["student"] and gs["kv"]["teacher"] == mla["kv"]["teacher"]
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and out.count("tok/s S") == 2
    assert main([*cli, "--passkey"]) == 2
    assert "--passkey takes one model" in capsys.readouterr().err
    assert main([*cli, "--stock-cells", "2x99"]) == 2
    assert "--stock-cells 2x99: not in the grid of batches x contexts" in capsys.readouterr().err


def test_stock_path_only_at_the_cells_asked(pair, monkeypatch):
    """--stock-cells: the stock engine runs at those cells only, the others have teacher_stock null; a
    partial result is handed over after every engine but the last."""
    student, teacher = pair
    partials = []
    settings = BenchSettings([6, 12], [1, 2], 2, 1, 0, stock_cells=[(2, 12)])
    result = bench.run_bench_many({"s": student}, teacher, settings, "float32", log=lambda _: None, partial=partials.append)["s"]
    stock = {(r["batch"], r["context"]): r["teacher_stock"] for r in result["runs"]}
    assert stock[(2, 12)]["decode_tok_s"] > 0 and [k for k, v in stock.items() if v is None] == [(1, 6), (2, 6), (1, 12)]
    assert result["runs"][3]["ratio_stock"]["decode_tok_s"] > 0 and result["runs"][0]["ratio_stock"]["decode_tok_s"] is None
    assert len(partials) == 2 and all(p["s"]["partial"] for p in partials) and "partial" not in result
    # the teacher runs first, so every partial result already has its figures
    assert all(r["teacher"] and r["student"] is None for r in partials[0]["s"]["runs"])
    assert all(r["teacher"] and r["student"] for r in partials[1]["s"]["runs"])


@pytest.mark.slow
def test_real_teacher_retrieves_the_key(smollm2):
    """With SmolLM2 the prompt, greedy decoding and answer parsing work end to end (it finds every key)."""
    model, tokenizer = smollm2
    result = run_passkey({"teacher": model}, tokenizer, [256], [0.0, 1.0], 1, log=lambda _: None)
    assert result["teacher"] == [[1.0, 1.0]]


def test_profile_counts_the_decode_step(pair):
    """--profile: every attnedit cell gets a profile of its decode steps; more layers, more work per step."""
    student, teacher = pair
    settings = BenchSettings([8], [1], 3, 1, 0, stock=False, profile=True)
    run = run_bench(student, teacher, settings, "float32", log=lambda _: None)["runs"][0]
    for name in ("student", "teacher"):
        prof = run[name]["profile"]
        assert prof["what"] == "CPU ops (no GPU)" and prof["kernels_per_step"] > 10 and prof["device_ms_per_step"] > 0
        assert sum(k["per_step"] for k in prof["by_kind"].values()) == pytest.approx(prof["kernels_per_step"], abs=0.5)
        assert prof["top"] and all(t["ms_per_step"] > 0 for t in prof["top"])
        # the prefill of 8 tokens does more work than one decode step
        assert run[name]["prefill_profile"]["device_ms_per_step"] > 0
        assert run[name]["prefill_profile"]["kernels_per_step"] >= prof["kernels_per_step"] * 0.8
    assert "profile" not in run_bench(student, teacher, BenchSettings([8], [1], 2, 1, 0, stock=False), "float32", log=lambda _: None)["runs"][0]["student"]
    assert profiling.kernel_kind("sm90_xmma_gemm_bf16bf16") == "gemm" and profiling.kernel_kind("triton_poi_fused_add_0") == "fused (triton)"
    assert profiling.kernel_kind("flash_fwd_splitkv_kernel") == "attention"


def test_compile_prefill_compiles_the_prefill_of_both_attnedit_engines_only(pair, monkeypatch):
    """--compile-prefill: the student and the teacher on attnedit's engine both prefill through compile_prefill
    (one path for both, so TTFT ratios stay fair), the header says so; without the flag both prefill eagerly."""
    student, teacher = pair
    monkeypatch.setattr(engines, "PREFILL_BACKEND", "aot_eager")  # no C++ compiler needed on the CPU
    seen = []
    real = type(student).compile_prefill

    def spy(self, backend="inductor"):
        seen.append(backend)
        return real(self, backend)

    monkeypatch.setattr(type(student), "compile_prefill", spy)
    settings = BenchSettings([8], [1], 2, 1, 0, stock=False, compile_prefill=True)
    result = run_bench(student, teacher, settings, "float32", log=lambda _: None)
    assert seen == ["aot_eager", "aot_eager", None, None] and "compiled prefill" in result["engines"]["student"]  # off again after
    assert result["runs"][0]["student"]["ttft_ms"] > 0 and result["runs"][0]["teacher"]["ttft_ms"] > 0
    seen.clear()
    result = run_bench(student, teacher, BenchSettings([8], [1], 2, 1, 0, stock=False), "float32", log=lambda _: None)
    assert seen == [None, None, None, None] and "compiled prefill" not in result["engines"]["student"]
    student.compile_prefill(None)


def test_fuse_projections_applies_to_both_attnedit_engines_and_is_undone(pair, monkeypatch):
    """--fuse-projections: the student and the teacher on attnedit's engine decode with fused projections (the
    header says so); after the run both are unfused again, flag or not."""
    student, teacher = pair
    seen = []
    real = type(student).fuse_projections

    def spy(self, fuse=True):
        seen.append((self is student, fuse, self.attentions()[0]._fused is not None))
        return real(self, fuse)

    monkeypatch.setattr(type(student), "fuse_projections", spy)
    settings = BenchSettings([8], [1], 2, 1, 0, stock=False, fuse_projections=True)
    result = run_bench(student, teacher, settings, "float32", log=lambda _: None)
    assert "fused projections" in result["engines"]["student"]
    assert [(s, f) for s, f, _ in seen] == [(False, True), (True, True), (False, False), (True, False)]
    assert seen[-1][2] and student.attentions()[0]._fused is None  # fused while timed, unfused after
    assert result["runs"][0]["student"]["decode_tok_s"] > 0 and result["runs"][0]["teacher"]["decode_tok_s"] > 0


def test_options_on_a_checkpoint_saved_before_them_fail_in_one_line_saying_what_to_do():
    """A student whose saved modeling code predates --fuse-projections/--compile-prefill: one line naming the flag
    and the way out; without those flags such a model (or a stock one) is left alone."""
    import types

    old = types.SimpleNamespace(model=types.SimpleNamespace())  # an engine whose model has neither method
    bench.set_engine_options({"student": old}, False, False)
    with pytest.raises(AttnEditError) as e:
        bench.set_engine_options({"student": old}, True, False)
    text = str(e.value)
    assert "\n" not in text and "--fuse-projections" in text and "--compile-prefill" not in text and "attnedit export" in text


def test_running_out_of_memory_while_compiling_counts_as_not_fitting():
    """A capacity probe whose compiled step runs out of memory while compiling: dynamo reports it as
    BackendCompilerFailed, which counted as a failure of the run (the Qwen3-8B 8k search stopped there)."""
    from torch._dynamo.exc import BackendCompilerFailed

    from attnedit.eval.bench.capacity import fits

    def compile_oom():
        raise BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.16 GiB."), None)

    assert fits(compile_oom) is None
    with pytest.raises(BackendCompilerFailed):  # a compiler failure of another kind is still an error
        fits(lambda: (_ for _ in ()).throw(BackendCompilerFailed(lambda: None, ValueError("bad graph"), None)))


def test_a_failed_measurement_frees_its_memory_before_the_other_models_move_back(monkeypatch):
    """When a measurement with one model resident fails, the tensors its frames hold are freed before the other
    models' weights move back to the device (before, they were still held, and moving back ran out of memory)."""
    import weakref

    from attnedit.eval.bench import capacity

    held, alive_at_restore = [], []
    monkeypatch.setattr(capacity, "tensors_to_move", lambda model, others: [torch.zeros(1)])
    real_release = capacity.release_memory

    def release():
        alive_at_restore.append(held[0]() is not None if held else None)
        real_release()

    monkeypatch.setattr(capacity, "release_memory", release)

    def measure():
        activations = torch.zeros(1000)
        held.append(weakref.ref(activations))
        raise RuntimeError("a failed measurement")

    with pytest.raises(RuntimeError, match="a failed measurement"):
        with capacity.resident_alone(None, []):
            measure()
    assert alive_at_restore[-1] is False, alive_at_restore


def test_experts_read_is_the_routed_count_at_one_token_and_all_of_them_at_many():
    from attnedit.eval.bench.timing import experts_read

    assert experts_read(128, 8, 1) == pytest.approx(8)  # Qwen3-30B-A3B at batch 1: its 8 experts a token
    assert experts_read(4, 2, 2) == pytest.approx(3)  # 4 * (1 - (1/2)^2): two tokens share one expert on average
    assert 125 < experts_read(128, 8, 64) < 126 and experts_read(128, 8, 10_000) == pytest.approx(128)


def test_routing_reads_each_moe_familys_config_and_none_for_a_dense_one():
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    from attnedit.eval.bench.timing import routing

    assert routing(DeepseekV3Config()) == (256, 8) and routing(MixtralConfig()) == (8, 2)
    assert routing(Qwen2MoeConfig()) == (60, 4) and routing(LlamaConfig()) is None
    student = edit_model(tiny_teacher("qwen3_moe"), "mla", {"kv_lora_rank": 24})
    assert routing(student.config) == (4, 2)  # an edited model answers for the teacher's config it keeps


@pytest.mark.parametrize("target,args", [(None, None), ("gateswa", GATESWA), ("mla", {"kv_lora_rank": 24})])
def test_a_moe_steps_bound_reads_the_experts_its_tokens_reach(target, args):
    """The HBM bound of a mixture of experts counts the routed experts a decode step's tokens reach (top-k of E a
    token, uniformly), not all of them: at batch 1 k of E, the attention and shared weights always; a dense model's
    bound is every weight at any batch. The bench's bytes_per_step is that bound."""
    from attnedit.eval.bench.timing import bytes_per_step, step_weight_bytes, weight_bytes

    teacher = tiny_teacher("qwen3_moe")
    model = teacher if target is None else edit_model(teacher, target, args)
    experts = sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.mlp.experts.parameters())
    held = weight_bytes(model)
    assert step_weight_bytes(model) == held  # no batch: every expert
    assert step_weight_bytes(model, 1) == held - experts + experts * 2 // 4  # 2 of 4 experts a token
    assert step_weight_bytes(model, 2) == held - experts + experts * 3 // 4
    kv = bytes_per_step(model, model.config, 2, 8, "float32") - step_weight_bytes(model, 2)
    assert kv > 0 and kv == bytes_per_step(model, model.config, 1, 8, "float32") * 2 - 2 * step_weight_bytes(model, 1)
    dense = edit_model(tiny_teacher("qwen3"), target, args) if target else tiny_teacher("qwen3")
    assert step_weight_bytes(dense, 1) == step_weight_bytes(dense, 64) == weight_bytes(dense)


def test_the_bench_of_a_moe_student_reports_its_routed_bound():
    teacher = tiny_teacher("qwen3_moe")
    student = edit_model(teacher, "gateswa", GATESWA)
    from attnedit.eval.bench.timing import bytes_per_step

    result = run_bench(student, teacher, BenchSettings([8], [1, 2], 2, 1, 0), "float32", log=lambda _: None)
    for r in result["runs"]:
        for name, model in (("student", student), ("teacher", teacher)):
            assert r[name]["bytes_per_step"] == bytes_per_step(model, model.config, r["batch"], 8, "float32")
    assert result["runs"][0]["student"]["bytes_per_step"] < result["runs"][1]["student"]["bytes_per_step"]
