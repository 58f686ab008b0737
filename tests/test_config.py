import subprocess
import sys

import pytest

from lmlab.cli import main
from lmlab.config import load_config
from lmlab.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 1.0e-3\n  batch_size: 4\nmodel:\n  name: mamba-swelu-small\n")
    cfg = load_config(f, ["train.lr=2e-3", "model.activation=silu", "data.source=[a.txt, b.txt]"])
    assert cfg.train.lr == 2e-3 and cfg.train.batch_size == 4
    assert cfg.model.name == "mamba-swelu-small" and cfg.model.overrides == {"activation": "silu"}
    assert cfg.data.source == ["a.txt", "b.txt"]
    assert cfg.to_dict()["model"] == {"name": "mamba-swelu-small", "trust_remote_code": False, "activation": "silu"}


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.lrr=1", "train.lrr: unknown key; allowed: max_steps"),
    ("trian.lr=1", "trian: unknown section"),
    ("model.name=nope", "model.name: unknown model 'nope'; allowed: mamba-swelu-tiny"),
    ("data.seq_len=0", "data.seq_len: must be >= 1"),
    ("train.schedule=step", "train.schedule: invalid value 'step'; allowed: cosine, linear, constant"),
    ("train.precision=fp8", "allowed: auto, fp32, bf16, fp16"),
    ("model.activation=relu", "model.activation: invalid value 'relu'; allowed: swelu, silu"),
    ("model.widht=3", "model.widht: unknown key for mamba-swelu"),
    ("train.max_steps=many", "train.max_steps: expected an integer"),
    ("data.seq_len=100000", "exceeds the model's maximum sequence length"),
    ("train.batch_size=true", "train.batch_size: expected an integer"),
    ("model.scan_backend=gpu", "model.scan_backend: 'gpu' is not a scan backend"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_two_budgets_rejected():
    with pytest.raises(ConfigError, match="only one budget"):
        load_config(None, ["train.max_steps=10", "train.token_ratio=20"])


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_error_is_one_line_exit_2(capsys):
    rc = main(["pretrain", "train.lr=-3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().count("\n") == 0 and "train.lr: must be > 0" in err and "Traceback" not in err


def test_cli_subprocess_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", "model.name=unknown-model",
                          f"run.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "model.name: unknown model" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("name", sorted(__import__("lmlab.cli").cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    """The command's own module is imported and its real parser built: it runs that module's `run`, every flag and
    positional (of nested actions too) says what it is, and `--help` shows the listing's line."""
    import argparse
    import importlib

    from lmlab.cli import COMMANDS, build_parser

    mod = importlib.import_module(f"lmlab.commands.{COMMANDS[name].module}")
    sub = next(a for a in build_parser(name)._actions if a.dest == "command").choices[name]
    assert sub.get_default("_run") is mod.run
    parsers = [sub]
    for p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.help is not argparse.SUPPRESS:
                assert (action.help or "").strip(), f"lmlab {name}: {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmlab {name}")
    assert " ".join(COMMANDS[name].help.split()) in " ".join(out.split())
