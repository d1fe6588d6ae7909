"""One schema for recipes, ``--set`` and the subcommands' flags: a settings field is a flag (name, type, default,
help, choices) and a recipe key, with the same typing and the same one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest
from test_cli_edit import attnedit

from attnedit import AttnEditError
from attnedit.cli.main import build_parser
from attnedit.eval.bench import BenchSettings
from attnedit.eval.inspect import InspectSettings
from attnedit.eval.passkey import PasskeySettings
from attnedit.eval.quality import QualitySettings
from attnedit.export import ExportSettings
from attnedit.recipe import EvalConfig, explain, parse_recipe, to_yaml
from attnedit.schema import add_flags, defaults, flag, from_args, setting

# subcommand -> (its settings dataclass, the arguments it needs besides the settings)
COMMANDS = {
    "eval": (QualitySettings, ["M"]),
    "bench": (BenchSettings, ["M", "--teacher", "T"]),
    "passkey": (PasskeySettings, ["M", "--teacher", "T"]),
    "inspect": (InspectSettings, ["M"]),
    "export": (ExportSettings, ["M", "--format", "hf", "--out", "O"]),
}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_is_a_flag_with_the_schema_default_and_help(command, capsys):
    cls, needed = COMMANDS[command]
    parser = subparser(command)
    args = parser.parse_args(needed)
    settings = from_args(cls, args)
    schema = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in schema.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue  # a required flag (export --format)
        assert getattr(args, name) == getattr(settings, name) == defaults(cls)[name], name
    code, out, _ = attnedit(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # help wraps lines
    for name, f in schema.items():
        assert flag(name) in text, name
        assert " ".join(f.metadata["help"].split())[:40] in text, name


def test_a_field_added_to_a_dataclass_is_a_typed_flag_with_its_help():
    @dataclass
    class Extended(BenchSettings):
        prompt_style: str = setting("random", "how the prompts are made", ("random", "text"))
        temperatures: list[float] = setting([0.0, 0.7], "sampling temperatures")
        max_batch: int | None = setting(None, "largest batch to try (default: no limit)")

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    text = " ".join(parser.format_help().split())
    assert "--prompt-style {random,text} how the prompts are made (default: random)" in text
    assert "--temperatures X[,X...] sampling temperatures (default: 0,0.7)" in text
    assert "--max-batch N largest batch to try (default: no limit)" in text
    assert "--stock, --no-stock" in text  # inherited fields stay flags
    args = parser.parse_args(["--temperatures", "0.5,1", "--max-batch", "8", "--no-stock", "--contexts", "64"])
    got = from_args(Extended, args)
    assert (got.temperatures, got.max_batch, got.stock, got.contexts, got.prompt_style) == ([0.5, 1.0], 8, False, [64], "random")
    # the recipe route types the same text the same way
    assert parse_recipe({}, {"eval.bench.contexts": "64"}).eval.bench.contexts == [64]


def test_flags_and_set_share_typing_and_checks(capsys):
    r = parse_recipe({}, {"eval.ppl_context": "2048,8192", "eval.ppl_tokens": "none", "eval.batch_size": "auto",
                          "eval.tasks": "wikitext2,arc_easy", "eval.passkey.depths": "0,0.5", "eval.bench.batches": "1,64",
                          "eval.bench.stock": "false", "eval.bench.compile": "none"})  # fmt: skip
    e = r.eval
    assert (e.ppl_context, e.ppl_tokens, e.batch_size, e.tasks) == ([2048, 8192], None, "auto", ["wikitext2", "arc_easy"])
    assert (e.passkey.depths, e.bench.batches, e.bench.stock, e.bench.compile) == ([0.0, 0.5], [1, 64], False, None)
    assert list(e.windows()) == ["wikitext2@2048", "wikitext2@8192"] and e.windows()["wikitext2@8192"].stride == 4096
    args = subparser("eval").parse_args(["M", "--ppl-context", "2048,8192", "--batch-size", "auto", "--tasks", "wikitext2,arc_easy",
                                         "--ppl-tokens", "none"])  # fmt: skip
    flags = from_args(QualitySettings, args)
    assert dataclasses.asdict(flags) == {k: v for k, v in dataclasses.asdict(e).items() if k not in ("passkey", "bench")}
    # YAML: a single value for a list field, and the resolved recipe round-trips
    r = parse_recipe({"eval": {"ppl_context": 4096, "passkey": {"contexts": 1024}}})
    assert r.eval.ppl_context == [4096] and r.eval.passkey.contexts == [1024]
    import yaml

    assert parse_recipe(yaml.safe_load(to_yaml(r))) == r


@pytest.mark.parametrize(
    "sets,message",
    [
        ({"eval.ppl_context": "2048", "eval.ppl_stride": "4096"}, "eval.ppl_stride=4096: must not exceed the perplexity window"),
        ({"eval.ppl_context": "2048,x"}, "eval.ppl_context='x' is not a valid int"),
        ({"eval.bench.repeats": "0"}, "eval.bench.repeats=0: must be at least 1"),
        ({"eval.passkey.depths": "0,2"}, "eval.passkey.depths=[0.0, 2.0]: must be fractions between 0 and 1"),
        ({"eval.batch_size": "many"}, "eval.batch_size='many' is not a valid int or 'auto'"),
        ({"eval.tasks": "wikitext2,no_such_task_xyz"}, "unknown task no_such_task_xyz"),
        ({"eval.bench.colour": "1"}, "unknown recipe field 'eval.bench.colour'"),
    ],
)
def test_bad_eval_settings_are_one_line(sets, message):
    with pytest.raises(AttnEditError) as e:
        parse_recipe({}, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "M", "--ppl-stride", "4096"], "attnedit: error: --ppl-stride 4096: must not exceed the perplexity window"),
        (["bench", "M", "--teacher", "T", "--repeats", "0"], "attnedit: error: --repeats 0: must be at least 1"),
        (["passkey", "M", "--teacher", "T", "--depths", "0,1.5"], "attnedit: error: --depths 0,1.5: must be fractions"),
        (["inspect", "M", "--context", "0"], "attnedit: error: --context 0: must be at least 1 token"),
        (["eval", "M", "--tasks", ""], "attnedit: error: --tasks is empty"),
    ],
)
def test_bad_flag_values_are_one_line(args, message, capsys):
    code, _, err = attnedit(capsys, *args)
    assert code == 2 and err.strip() == err.strip().splitlines()[0] and err.startswith(message), err


def test_malformed_flag_values_are_usage_errors(capsys):
    code, _, err = attnedit(capsys, "bench", "M", "--teacher", "T", "--contexts", "1024,many")
    assert code == 2 and "argument --contexts: 'many' is not a valid int" in err


def test_old_flag_spellings_still_work():
    args = subparser("bench").parse_args(["A", "B", "--teacher", "T", "--no-stock", "--no-compile", "--passkey", "--profile",
                                          "--stock-cells", "1x8192,64X8192"])  # fmt: skip
    assert (args.model, args.stock, args.compile, args.passkey, args.profile) == (["A", "B"], False, False, True, True)
    assert args.stock_cells == [(1, 8192), (64, 8192)]
    assert parse_recipe({"eval": {"bench": {"contexts": [8192], "batches": [1, 64], "stock_cells": [[64, 8192]]}}}).eval.bench.stock_cells == [(64, 8192)]
    args = subparser("export").parse_args(["M", "--format", "stock", "--out", "O", "--no-check", "--check-context", "96"])
    assert (args.format, args.check, args.check_context) == ("stock", False, 96)
    args = subparser("eval").parse_args(["M", "--ppl-context", "512", "--num-fewshot", "0", "--limit", "5"])
    assert (args.ppl_context, args.num_fewshot, args.limit) == ([512], 0, 5)


def test_explain_lists_the_eval_fields():
    text = "\n" + explain()
    for name in ("eval.tasks", "eval.limit", "eval.num_fewshot", "eval.batch_size", "eval.ppl_context", "eval.ppl_stride",
                 "eval.ppl_tokens", "eval.data_dir", "eval.passkey.contexts", "eval.passkey.depths", "eval.passkey.trials",
                 "eval.bench.contexts", "eval.bench.batches", "eval.bench.decode_tokens", "eval.bench.repeats",
                 "eval.bench.warmup", "eval.bench.stock", "eval.bench.compile"):  # fmt: skip
        assert f"\n{name} " in text, name
    # nothing is evaluated by default; the section's other defaults are the commands' defaults
    e = EvalConfig()
    assert e.parts() == [] and (e.tasks, e.passkey.contexts, e.bench.contexts) == ([], [], [])
    assert e.ppl_context == QualitySettings().ppl_context and e.bench.batches == BenchSettings().batches
