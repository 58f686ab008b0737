"""The command line itself: every command is listed, `--help` stays light, and errors are one line."""

import importlib
import json
import subprocess
import sys

from lmlab.cli import COMMANDS


def test_every_command_module_matches_the_listing():
    for name, (module, help_line) in COMMANDS.items():
        mod = importlib.import_module(f"lmlab.commands.{module}")
        assert mod.HELP == help_line, name
        assert callable(mod.add_arguments) and callable(mod.run)


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, json\nfrom lmlab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "pretrain" in out.stdout and "quickstart" in out.stdout


def test_a_command_help_loads_only_its_module():
    code = ("import sys\nfrom lmlab.cli import main\ntry:\n    main(['models', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('lmlab.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "'lmlab.commands.models'" in out.stdout and "'lmlab.commands.pretrain'" not in out.stdout
