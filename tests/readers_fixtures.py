"""Run folders written by the real trainer, once per test session, for the readers' tests (status, watch, doctor,
plot, report): a tiny MambaSWELU on a few dozen standard-library files, 32-token rows, 10 steps.

    real_runs (session fixture) -> {"healthy": Path, "nan": Path, "guard_stop": Path, "stderr": {name: str}}

`nan` diverges with the guard off (its metrics.jsonl holds "nan" strings); `guard_stop` diverges with
`train.guard=stop` (the guard's event names the first bad step; the trainer prints its resume command).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
TINY = ("model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
        "data.source=stdlib", "data.max_docs=30", "data.seq_len=32", "train.batch_size=4", "train.max_steps=10",
        "train.save_every=5", "train.eval_every=5", "train.eval_batches=2", "train.log_every=1", "train.threads=1",
        "train.sample_tokens=4", "train.progress=false", "train.warmup_steps=2")
RUNS = {
    "healthy": ("train.lr=3e-3",),
    "nan": ("train.lr=1e6", "train.guard=off"),
    "guard_stop": ("train.lr=1e6", "train.guard=stop"),
}


def cli(*args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory) -> dict:
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("real-runs")
    tok = root / "tok"
    train_bpe("stdlib", 512, tok, max_chars=200_000)
    env = {**ENV, "LMLAB_CACHE": str(root / "cache")}
    out: dict = {"stderr": {}, "root": root}
    for name, extra in RUNS.items():
        res = cli("pretrain", *TINY, f"data.tokenizer={tok}", f"run.out_dir={root / 'runs'}", f"run.name={name}",
                  *extra, env=env)
        run = root / "runs" / name
        assert (run / "metrics.jsonl").is_file(), res.stdout[-2000:] + res.stderr[-2000:]
        if name == "healthy":
            assert res.returncode == 0, res.stderr[-3000:]
        out[name] = run
        out["stderr"][name] = res.stderr
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder to change (the session's folders stay as the trainer wrote them), named after `dst`."""
    import json

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock"))
    manifest = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps({**manifest, "name": dst.name}, indent=1))
    return dst
