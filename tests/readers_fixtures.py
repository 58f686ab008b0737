"""The readers' commands run in this process, as the CLI runs them, for tests on run folders the trainer wrote
(tests/fixture_runs.py: pretrain_run, diverged_runs, killed_run, lora_run, sharded_run).

    lmlab (fixture) -> run(*args) -> Result(returncode, stdout, stderr)    `lmlab.cli.main(args)`, output captured
    rewrite(run, fn)                                                        edit a copy's metrics.jsonl record by record
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def lmlab(capsys):
    """`lmlab.cli.main` with the arguments given (paths as str), its exit code and what it printed."""
    from lmlab.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def rewrite(run: Path, fn) -> None:
    """Apply `fn` to each record of metrics.jsonl (it returns the record, or None to drop it)."""
    path = Path(run) / "metrics.jsonl"
    recs = [fn(json.loads(x)) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs if r is not None))
