"""Run folders written by the real trainer, once per test session, for the readers (status, watch, doctor, plot,
report) and the run loader (lmlab.runs.load): a tiny MambaSWELU (d_model 32, 2 layers) on 30 standard-library
files, 32-token rows, one thread, trained in this process.

    pretrain_run    finished: 10 steps, checkpoints at 5 and 10, an eval and samples every 5, final/
    diverged_runs   {"nan": Path, "guard_stop": Path, "guard_message": str}: lr 1e6 with the guard off (the loss
                    is logged as "nan") and with train.guard=stop (stopped; the message ends with its resume command)
    killed_run      a separate trainer process SIGKILLed once its step-5 checkpoint was complete: run.json still
                    says running, with the pid of a process that is gone, and there is no final/
    lora_run        LoRA (rank 4) on pretrain_run's final/, 6 steps: checkpoints at 3 and 6, final/ an adapter folder
    sharded_run     train.strategy=fsdp in one process, 6 steps: checkpoints at 3 and 6 hold dcp/ shards

Each folder is shared by the whole session and must end it as the trainer left it (checked at teardown, naming
the folder): a test that changes a run, or lets a reader write into it (resolve_base writes exports/), works on
`copy_run(src, dst)`. Each fixture is built only when a test asks for it; `pretrain_run` takes ~3 s on one core.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODEL = ("model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32")
TRAIN = ("data.source=stdlib", "data.max_docs=30", "data.seq_len=32", "train.batch_size=4", "train.max_steps=10",
        "train.save_every=5", "train.eval_every=5", "train.eval_batches=2", "train.log_every=1", "train.threads=1",
        "train.sample_tokens=4", "train.progress=false", "train.warmup_steps=2", "train.lr=3e-3")
TINY = MODEL + TRAIN


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.name == "run.lock":
            continue
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _unchanged(*folders: Path) -> dict[Path, str]:
    return {f: _digest(f) for f in folders}


def _check(before: dict[Path, str]) -> None:
    """Session folders are read-only: fail naming each of them that changed since `before`."""
    changed = [str(f) for f, d in before.items() if _digest(f) != d]
    assert not changed, f"a test changed the session's trainer-written run folder(s) {changed}; use copy_run"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a session run folder to change, named after `dst` (run.json's name too)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock"))
    manifest = dst / "run.json"
    if manifest.is_file():
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": dst.name}, indent=1))
    return dst


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory, stdlib_tokenizer_dir) -> Path:
    """The folder the session's runs are written into (runs/) beside their data cache (cache/)."""
    root = tmp_path_factory.mktemp("trained-runs")
    (root / "runs").mkdir()
    return root


def train_run(root: Path, tokenizer: Path, name: str, *overrides: str,
              base: tuple[str, ...] = TINY) -> tuple[Path, list[str], Exception | None]:
    """Train `name` under root/runs in this process with `base` + `overrides`, one thread, the cache under root;
    (run folder, what the trainer said, the TrainingDiverged it ended with or None). The session's thread count
    and environment are restored after."""
    import torch

    from lmlab.config import load_config
    from lmlab.train.loop import TrainingDiverged, train

    threads, said = torch.get_num_threads(), []
    cfg = load_config(None, [*base, f"data.tokenizer={tokenizer}", f"run.out_dir={root / 'runs'}",
                             f"run.name={name}", *overrides])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        try:
            run = train(cfg, echo=said.append)
            return run, said, None
        except TrainingDiverged as e:
            return root / "runs" / name, said, e
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrain_run(runs_root, stdlib_tokenizer_dir) -> Path:
    run, said, err = train_run(runs_root, stdlib_tokenizer_dir, "pretrain")
    assert err is None and (run / "final" / "config.json").is_file(), said[-20:]
    before = _unchanged(run)
    yield run
    _check(before)


@pytest.fixture(scope="session")
def diverged_runs(runs_root, stdlib_tokenizer_dir) -> dict:
    nan, said, err = train_run(runs_root, stdlib_tokenizer_dir, "nan", "train.lr=1e6", "train.guard=off")
    assert (nan / "metrics.jsonl").is_file(), said[-20:]
    stop, said, err = train_run(runs_root, stdlib_tokenizer_dir, "guard_stop", "train.lr=1e6", "train.guard=stop")
    assert err is not None, said[-20:]
    before = _unchanged(nan, stop)
    yield {"nan": nan, "guard_stop": stop, "guard_message": str(err)}
    _check(before)


@pytest.fixture(scope="session")
def lora_run(runs_root, pretrain_run) -> Path:
    final = pretrain_run / "final"
    run, said, err = train_run(runs_root, final, "lora", f"model.name={final}", "finetune.method=lora",
                               "finetune.lora_rank=4", "train.max_steps=6", "train.save_every=3",
                               "train.eval_every=3", base=TRAIN)
    assert err is None and (run / "final" / "adapter_config.json").is_file(), said[-20:]
    before = _unchanged(run)
    yield run
    _check(before)


@pytest.fixture(scope="session")
def sharded_run(runs_root, stdlib_tokenizer_dir) -> Path:
    run, said, err = train_run(runs_root, stdlib_tokenizer_dir, "sharded", "train.strategy=fsdp", "train.max_steps=6",
                               "train.save_every=3", "train.eval_every=3")
    assert err is None and (run / "checkpoints" / "step-00000006" / "dcp").is_dir(), said[-20:]
    before = _unchanged(run)
    yield run
    _check(before)


@pytest.fixture(scope="session")
def killed_run(runs_root, stdlib_tokenizer_dir) -> Path:
    """The trainer in its own process (the CLI), killed with SIGKILL once checkpoints/step-00000005 is complete."""
    run = runs_root / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LMLAB_CACHE": str(runs_root / "cache")}
    args = [*TINY, "train.max_steps=100000", f"data.tokenizer={stdlib_tokenizer_dir}",
            f"run.out_dir={runs_root / 'runs'}", "run.name=killed"]
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "pretrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (run / "checkpoints" / "step-00000005" / "MANIFEST.json").is_file():
            assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before its first checkpoint: " \
                                        f"{proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    before = _unchanged(run)
    yield run
    _check(before)
