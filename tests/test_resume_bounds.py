"""`lmlab resume` against the run's own end: a budget below the step of the latest checkpoint is refused on one
line, naming the budget, the step and the checkpoint, before the run folder is touched; a budget that ends at
that step finishes the run there (its export), or, when the run has finished already, says so and leaves it as
it is; a multi-stage run refuses overrides (its stages keep the spec they started with)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixture_runs import copy_run

from lmlab import runs
from lmlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def _snapshot(run: Path) -> dict[str, bytes | None]:
    """Every path under `run` (folders too) with its bytes: names, sizes and contents at once."""
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in sorted(run.rglob("*"))}


def _latest_step(run: Path) -> tuple[int, Path]:
    latest = runs.latest_checkpoint(run / runs.CHECKPOINTS)
    return runs.step_of(latest), latest


def _below(budget: str, step: int, run: Path, latest: Path) -> str:
    return (f"lmlab resume: error: {budget} is below step {step} of {run}'s latest checkpoint ({latest}); "
            f"give a larger value")


def test_a_budget_below_the_latest_checkpoint_is_refused_and_the_folder_is_untouched(killed_run, tmp_path):
    """A run killed after its step-N checkpoint, resumed with train.max_steps < N: one line, exit 2, and the
    folder byte for byte as it was (config.yaml not rewritten, no lock, no run.json session, no log line)."""
    run = copy_run(killed_run, tmp_path / "killed")
    step, latest = _latest_step(run)
    assert step >= 5 and not (run / "final").exists()
    before = _snapshot(run)
    res = _cli("resume", str(run), f"train.max_steps={step - 2}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.splitlines() == [_below(f"train.max_steps={step - 2}", step, run, latest)]
    assert res.stdout == ""
    assert _snapshot(run) == before


def test_a_token_budget_below_it_names_its_steps(killed_run, tmp_path, capsys):
    run = copy_run(killed_run, tmp_path / "killed")
    step, latest = _latest_step(run)
    before = _snapshot(run)
    tokens = 128 * (step - 1)  # 4 rows × 32 tokens per step: one step short
    assert main(["resume", str(run), "train.max_steps=null", f"train.max_tokens={tokens}"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [_below(f"train.max_tokens={tokens} ({step - 1} steps)", step, run, latest)]
    assert _snapshot(run) == before


def test_a_budget_at_the_checkpoint_finishes_an_unfinished_run_there(killed_run, tmp_path, capsys):
    """max_steps == the checkpoint's step on a run that has not finished: no step trained, the run exported."""
    run = copy_run(killed_run, tmp_path / "killed")
    step, _ = _latest_step(run)
    trained = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    assert main(["resume", str(run), f"train.max_steps={step}"]) == 0
    assert capsys.readouterr().err == ""
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["step"] == step
    assert (run / "final" / "config.json").is_file() and not (run / "run.lock").exists()
    after = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert after == trained  # nothing trained: every train record is the killed run's own
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == step


def test_a_finished_run_is_left_as_it_is_or_refused(pretrain_run, tmp_path, capsys):
    """A finished run (its last checkpoint at its budget, exported): `lmlab resume` with its own budget, with or
    without other settings, says so on one line and changes nothing (as `run.if_exists=resume` does); a smaller
    budget is refused."""
    run = copy_run(pretrain_run, tmp_path / "done")
    step, latest = _latest_step(run)
    assert step == 10 and json.loads((run / "run.json").read_text())["status"] == "finished"
    before = _snapshot(run)
    done = f"run       {run} finished already; nothing to do (lmlab resume {run} train.max_steps=N trains on)"
    res = _cli("resume", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [done] and res.stderr == ""
    assert _snapshot(run) == before
    assert main(["resume", str(run), f"train.max_steps={step}", "train.lr=1e-4"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [done] and out.err == ""
    assert _snapshot(run) == before
    assert main(["resume", str(run), "train.max_steps=9"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [_below("train.max_steps=9", step, run, latest)]
    assert _snapshot(run) == before


def test_a_multi_stage_run_refuses_overrides(tmp_path, stdlib_tokenizer_dir, capsys):
    """A multi-stage run resumes with the spec it started with: an override (which no stage would read) is refused
    on one line, the folder untouched."""
    from lmlab.train.stages import train_stages

    spec = {"model": {"name": "mamba-swelu-tiny", "d_model": 32, "n_layers": 2, "dense_hidden": 32},
            "data": {"source": "stdlib", "max_docs": 20, "tokenizer": str(stdlib_tokenizer_dir), "seq_len": 32},
            "train": {"batch_size": 4, "threads": 1, "progress": False, "sample_tokens": 2, "warmup_steps": 0,
                      "eval_every": 1000, "eval_batches": 1, "log_every": 1, "save_every": 2, "system_every": 0},
            "run": {"name": "staged", "out_dir": str(tmp_path / "runs")},
            "stages": [{"name": "a", "train": {"max_steps": 2}}]}
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump(spec))
    run = train_stages(tmp_path / "stages.yaml", echo=lambda *a: None)
    assert json.loads((run / "stages.json").read_text())["a"]["status"] == "finished"
    before = _snapshot(run)
    assert main(["resume", str(run), "train.max_steps=1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lmlab resume: error: override 'train.max_steps=1': a multi-stage run continues with its own stages.yaml "
        f"({run / 'stages.yaml'}); resume without overrides"]
    assert _snapshot(run) == before
