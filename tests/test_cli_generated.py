"""The command line is generated from the typed config: the keys' help and choices, the short flags of one alias
table, and the sampling/device/template/hardware/budget flags defined once and shared."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from lmlab import config
from lmlab.cli import COMMANDS, build_parser, main
from lmlab.commands._common import ALIASES, BUDGET, alias_overrides
from lmlab.errors import ConfigError

COMMANDS_DIR = Path(config.__file__).parent / "commands"


def _parser(command: str) -> argparse.ArgumentParser:
    return next(a for a in build_parser(command)._actions if a.dest == "command").choices[command]


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def _flag(command: str, flag: str) -> argparse.Action | None:
    return next((a for a in _parser(command)._actions if flag in a.option_strings), None)


# ------------------------------------------------------------------------------------------- keys and help text
def test_every_key_has_help_and_its_type_checks_its_default():
    keys = config.keys()
    assert len(keys) > 100 and "train.chunked_loss" in keys and "train.loss_chunk_mb" in keys
    for k in keys.values():
        assert k.help.strip(), f"{k.name}: no help text"
        assert config.coerce(k.name, k.default) == k.default, k.name  # the annotation admits the default
        if k.choices:
            assert k.default in k.choices, k.name


@pytest.mark.parametrize("command,sections", [("pretrain", None), ("finetune", None), ("dpo", None), ("grpo", None),
                                              ("quickstart", None), ("advise", None), ("resume", ("train", "log"))])
def test_the_help_lists_every_key_with_its_default(command, sections, capsys):
    out = _help(command, capsys)
    want = [k for k in config.keys().values() if sections is None or k.name.split(".")[0] in sections]
    for k in want:
        assert f"  {k.name}={k.shown_default()}" in out, f"lmlab {command} --help lacks {k.name}={k.shown_default()}"
        first_words = " ".join(k.help.split()[:4])
        assert first_words in " ".join(out.split()), f"lmlab {command} --help lacks the help of {k.name}"
        if k.choices:
            assert "{" + ", ".join(map(str, k.choices)) + "}" in out, k.name
    if sections is not None:
        assert "  data.seq_len=" not in out
    # grouped by section, in the dataclasses' order
    heads = [m.group(1) for m in re.finditer(r"^(\w+):$", out.split("config keys (", 1)[1], re.M)]
    assert heads == [f.name for f in dataclasses.fields(config.Config) if sections is None or f.name in sections]


def test_the_help_shows_the_new_keys_help(capsys):
    out = " ".join(_help("pretrain", capsys).split())
    assert "train.chunked_loss=auto {auto, on, off}" in out and "train.loss_chunk_mb=256" in out
    assert "exceed loss_chunk_mb" in out and "in MiB" in out


# ------------------------------------------------------------------------------------------------ choices
def test_choices_are_literal_types_and_nothing_else_spells_them():
    """Choices live in the annotations only: no CHOICES table, and no command module writes a choice list out."""
    assert not hasattr(config, "CHOICES")
    lists = {k.name: k.choices for k in config.keys().values() if k.choices and len(k.choices) > 2}
    assert {"train.schedule", "train.device", "finetune.method", "finetune.template"} <= set(lists)
    sources = {p.name: p.read_text() for p in COMMANDS_DIR.glob("*.py")}
    for key, choices in lists.items():
        spelled = re.compile(r"""["']?\s*[,/|]\s*["']?""".join(re.escape(str(c)) for c in choices))
        for name, text in sources.items():
            assert not spelled.search(text), f"commands/{name} spells out {key}'s choices"


@pytest.mark.parametrize("override,message", [
    ("train.chunked_loss=maybe", "train.chunked_loss: invalid value 'maybe'; allowed: auto, on, off"),
    ("train.loss_chunk_mb=0", "train.loss_chunk_mb: must be > 0"),
    ("train.loss_chunk_mb=1.5", "train.loss_chunk_mb: expected an integer"),
    ("train.zero_stage=3", "train.zero_stage: invalid value 3; allowed: 1, 2"),
    ("train.zero_stage=true", "train.zero_stage: invalid value True; allowed: 1, 2"),
    ("finetune.dpo_reference=frozen", "finetune.dpo_reference: invalid value 'frozen'; allowed: auto"),
])
def test_literal_and_range_checks(override, message):
    with pytest.raises(ConfigError) as e:
        config.load_config(None, [override])
    assert str(e.value).startswith(message)


def test_yaml_booleans_spelled_as_a_choice_are_that_choice():
    cfg = config.load_config(None, ["train.chunked_loss=off", "train.guard=off", "train.zero_stage=1"])
    assert (cfg.train.chunked_loss, cfg.train.guard, cfg.train.zero_stage) == ("off", "off", 1)


def test_validate_reads_the_literals_for_a_config_built_in_code():
    cfg = config.Config()
    cfg.train.schedule = "step"
    with pytest.raises(ConfigError, match="train.schedule: invalid value 'step'; allowed: cosine, linear, constant"):
        config.validate(cfg)


# ------------------------------------------------------------------------------------------------- aliases
def test_every_alias_names_an_existing_key():
    keys = config.keys()
    for flag, key in ALIASES.items():
        assert flag.startswith("--") and key in keys, (flag, key)
    assert len(set(ALIASES.values())) == len(ALIASES)  # one flag per key


def test_alias_flags_are_typed_and_documented_by_their_key():
    """On every command, each alias flag names its key in its help, and its choices are the key's."""
    for command in COMMANDS:
        p = _parser(command)
        for dest, (key, flag) in (p.get_default("_aliases") or {}).items():
            action = next(a for a in p._actions if a.dest == dest)
            assert flag in action.option_strings and ALIASES[flag] == key, (command, flag)
            assert f"({key})" in action.help or f"({key}; default " in action.help, (command, flag)
            k = config.keys()[key]
            if k.choices:
                assert action.metavar == "{" + ",".join(map(str, k.choices)) + "}", (command, flag)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "dpo", "grpo"])
def test_training_commands_share_the_short_flags(command):
    for flag in ("--model", "--data", "--name", "--seq-len", "--lr", *BUDGET):
        assert _flag(command, flag) is not None, (command, flag)


def test_pretrain_has_the_text_field_flag_its_data_errors_name():
    """lmlab.data.sources tells a user whose .jsonl lacks the field to choose it with --text-field."""
    assert "--text-field" in (COMMANDS_DIR.parent / "data" / "sources.py").read_text()
    args = build_parser("pretrain").parse_args(["pretrain", "--text-field", "body"])
    assert alias_overrides(args) == ['data.text_field="body"']


def test_a_flag_and_its_key_value_spelling_give_the_same_config():
    argv = ["--data", "a b.txt", "--text-field", "body", "--seq-len", "64", "--lr", "1e-3", "--tokens", "2.5e9",
            "--name", "2024", "--model", "mamba-swelu-tiny"]
    args = build_parser("pretrain").parse_args(["pretrain", *argv])
    by_flags = config.load_config(None, alias_overrides(args))
    by_keys = config.load_config(None, ["data.source=a b.txt", "data.text_field=body", "data.seq_len=64",
                                        "train.lr=1e-3", "train.max_tokens=2500000000", "run.name='2024'",
                                        "model.name=mamba-swelu-tiny"])
    assert by_flags == by_keys and by_flags.run.name == "2024" and by_flags.train.max_tokens == 2_500_000_000
    tuned = build_parser("finetune").parse_args(["finetune", "--data", "x.json", "hf:a/b@train", "--method", "lora"])
    assert alias_overrides(tuned) == ['data.source=["x.json", "hf:a/b@train"]', 'finetune.method="lora"']
    assert alias_overrides(build_parser("pretrain").parse_args(["pretrain"])) == []  # unset flags set nothing


@pytest.mark.parametrize("argv,key,flag", [
    (["finetune", "--method", "foo"], "finetune.method: invalid value 'foo'; allowed: full, lora, qlora", "--method"),
    (["dpo", "--template", "alpaca"], "finetune.template: invalid value 'alpaca'", "--template"),
    (["pretrain", "--steps", "many"], "train.max_steps: expected an integer, got 'many'", "--steps"),
    (["estimate", "--method", "dora"], "finetune.method: invalid value 'dora'", "--method"),
    (["pretrain", "--seq-len", "0"], "data.seq_len: must be >= 1, got 0", "--seq-len"),
    (["pretrain", "data.seq_len=0"], "data.seq_len: must be >= 1, got 0", "--seq-len"),
])
def test_a_bad_value_is_one_line_naming_key_and_flag(argv, key, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err, err
    assert err.startswith(f"lmlab {argv[0]}: error: {key}") and err.rstrip().endswith(f"({flag})"), err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------- shared flag groups
DEVICE_COMMANDS = ("generate", "chat", "compare", "serve", "eval", "estimate")


def test_device_has_one_choice_list():
    for command in DEVICE_COMMANDS:
        assert tuple(_flag(command, "--device").choices) == typing.get_args(config.Device), command
    assert config.keys()["train.device"].choices == typing.get_args(config.Device)


def test_chat_templates_are_the_finetune_templates():
    for command in ("chat", "serve"):
        assert tuple(_flag(command, "--template").choices) == config.keys()["finetune.template"].choices


@pytest.mark.parametrize("command", ["generate", "chat", "compare"])
def test_sampling_flags_are_one_definition(command):
    p = _parser(command)
    sampling = next(g for g in p._action_groups if g.title == "sampling")
    assert {o for a in sampling._group_actions for o in a.option_strings} == {
        "-n", "--max-new-tokens", "-t", "--temperature", "--top-k", "--top-p", "--greedy", "--seed"}


@pytest.mark.parametrize("argv,fragment", [
    (["-t", "-1"], "--temperature: must be a number >= 0"),
    (["--top-k", "-2"], "--top-k: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["-n", "0"], "--max-new-tokens: must be >= 1"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_check_sampling_alike_before_loading(command, argv, fragment, capsys):
    assert main([command, "no-such-model-folder", *argv]) == 2  # refused before the model is looked for
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_budget_and_hardware_flags_are_shared():
    for command in ("pretrain", "estimate"):
        for flag in BUDGET:
            assert _parser(command).get_default("_aliases")[flag[2:].replace("-", "_")][0] == ALIASES[flag]
    for command in ("estimate", "advise", "report"):
        hw = _flag(command, "--hardware")
        assert "h100" in hw.help and "rtx4090" in hw.help, command
    for command in ("estimate", "report"):
        assert _flag(command, "--price-per-hour").type is float
    assert build_parser("report").parse_args(["report", "runs", "--gpu", "h100"]).hardware == "h100"  # old spelling


# ------------------------------------------------------------------------------------- overrides after flags
def test_overrides_are_taken_before_and_after_flags(capsys):
    """`lmlab resume RUN --force train.max_steps=20` and `lmlab pretrain --model M key=value --seq N key=value`:
    every key=value reaches the overrides in the order given, wherever the flags stand; anything else after a
    flag is still refused in one line."""
    from lmlab.cli import _parse

    args = _parse(build_parser("resume"), ["resume", "runs/r", "train.lr=1e-4", "--force", "train.max_steps=20"])
    assert args.force and args.run == "runs/r" and args.overrides == ["train.lr=1e-4", "train.max_steps=20"]
    argv = ["pretrain", "--model", "mamba-swelu-tiny", "train.lr=1e-3", "--seq", "64", "train.max_steps=3"]
    args = _parse(build_parser("pretrain"), argv)
    assert args.overrides == ["train.lr=1e-3", "train.max_steps=3"]
    assert main(["resume", "runs/r", "--force", "train.max_steps=20", "stray"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
