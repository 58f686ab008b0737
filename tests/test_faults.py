"""Faults a long run must survive, each on real processes:

- kill -9 of training processes twice, at random steps, under `torchrun --max-restarts` (the field's
  supervisor) with `run.if_exists=resume`: the restarted workers continue from the last checkpoint and end
  bitwise equal to an uninterrupted run (dropout on), at 1 and 2 ranks; a negative control that does not
  restore the RNG states ends different, so the comparison can fail;
- a save killed halfway: the next start resumes from the previous checkpoint, exactly;
- an error on rank 0 alone (the run folder exists, disk full) reaches every rank as the same line instead
  of leaving the others waiting at the next collective.

Run as a script (`python tests/test_faults.py --no-rng-restore ARGS…` or `--die-while-saving STEP ARGS…`)
this file is the lmlab CLI with one fault built in; torchrun starts it that way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
STEPS, SAVE_EVERY = 24, 4


# ------------------------------------------------------------------------------------ the CLI with a fault
def _cli_with_fault(argv: list[str]) -> int:
    from lmlab import cli
    from lmlab.train import checkpoint

    if argv[0] == "--no-rng-restore":  # the negative control: everything restored but the RNG streams
        checkpoint.set_rng_state = lambda state: None
        argv = argv[1:]
    elif argv[0] == "--die-while-saving":  # SIGKILL itself in the middle of writing checkpoint `step`
        step, argv = int(argv[1]), argv[2:]
        save_model = checkpoint.save_model

        def save_then_die(model, path, *a, **kw):
            save_model(model, path, *a, **kw)
            if Path(path).parent.name.startswith(".") and f"step-{step:08d}" in Path(path).parent.name:
                os.kill(os.getpid(), signal.SIGKILL)  # weights written, trainer state and manifest not

        checkpoint.save_model = save_then_die
    return cli.main(argv)


# ------------------------------------------------------------------------------------------------ helpers
def _args(tok: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2",
            "model.dense_hidden=32", "model.dropout=0.1", "data.source=stdlib", "data.max_docs=60",
            f"data.tokenizer={tok}", "data.seq_len=32", "train.batch_size=4", f"train.max_steps={STEPS}",
            f"train.save_every={SAVE_EVERY}", "train.eval_every=8", "train.eval_batches=2", "train.log_every=1",
            "train.threads=1", "train.sample_tokens=4", "train.progress=false", "train.warmup_steps=4",
            "train.lr=3e-3", "train.system_every=0", f"run.out_dir={out}", f"run.name={name}", *extra]


def _torchrun(nproc: int, argv: list[str], restarts: int = 0, script: bool = False) -> list[str]:
    target = [str(HERE)] if script else ["-m", "lmlab.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "--max-restarts", str(restarts),
            "--monitor-interval", "0.2", *target, *argv]


def _events(run: Path) -> list[dict]:
    out = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                pass
    return out


def _progress(run: Path) -> tuple[int, int]:
    """(starts so far — the first plus each resume, the newest train step since the last start)."""
    starts, step = 0, 0
    for e in _events(run):
        if e.get("event") in ("start", "resume"):
            starts, step = starts + 1, e["step"]
        elif e.get("kind") == "train":
            step = e["step"]
    return starts, step


def _workers(agent: int) -> list[int]:
    """The training processes torchrun started (its children running lmlab)."""
    kids = []
    for task in Path(f"/proc/{agent}/task").iterdir():
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return [p for p in kids if b"lmlab" in Path(f"/proc/{p}/cmdline").read_bytes()
            or b"test_faults" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _end(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers (each in a session of its own), if still there."""
    if agent.poll() is None:
        for pid in _workers(agent.pid):
            os.kill(pid, signal.SIGKILL)
        agent.kill()
        agent.wait()


def _torchrun_ok(cmd: list[str]) -> None:
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = agent.communicate(timeout=600)[0].decode()
    finally:
        _end(agent)
    assert agent.returncode == 0, out[-3000:]


def _deaths(run: Path) -> list[tuple[int, int]]:
    """(the last step trained before each restart, the step that restart resumed from)."""
    out, last = [], 0
    for e in _events(run):
        if e.get("kind") == "train":
            last = e["step"]
        elif e.get("event") == "resume":
            out.append((last, e["step"]))
    return out


def _chaos(cmd: list[str], run: Path, kill_at: list[int], rng: random.Random) -> list[str]:
    """Start `cmd` (a torchrun with restarts); SIGKILL one of its workers at each step of `kill_at`."""
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for i, step in enumerate(kill_at):
            deadline = time.time() + 240
            while time.time() < deadline and agent.poll() is None:
                starts, now = _progress(run)
                if starts == i + 1 and now >= step:
                    break
                time.sleep(0.02)
            assert agent.poll() is None, agent.communicate()[0].decode()[-3000:]
            workers = _workers(agent.pid)
            assert workers, "no worker process found"
            os.kill(rng.choice(workers), signal.SIGKILL)
        out = agent.communicate(timeout=600)[0].decode()
    finally:
        _end(agent)
    assert agent.returncode == 0, out[-4000:]
    return out.splitlines()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_two_kills_at_random_steps_with_automatic_restart_end_bitwise_equal(stdlib_tokenizer_dir, tmp_path, nproc):
    rng = random.Random()
    kill_at = [rng.randint(SAVE_EVERY + 1, 11), rng.randint(14, STEPS - 3)]
    print(f"killing one of {nproc} workers at steps {kill_at}")
    _torchrun_ok(_torchrun(nproc, _args(stdlib_tokenizer_dir, tmp_path, "straight")))

    chaos = tmp_path / "chaos"
    _chaos(_torchrun(nproc, _args(stdlib_tokenizer_dir, tmp_path, "chaos", "run.if_exists=resume"), restarts=2), chaos,
           kill_at, rng)
    starts = [e["event"] for e in _events(chaos) if e.get("event") in ("start", "resume")]
    assert starts == ["start", "resume", "resume"]
    # each died at or after its kill step and went back to the last complete checkpoint (a save may have
    # been cut short), then trained on from there
    deaths = _deaths(chaos)
    for (died, resumed), target in zip(deaths, kill_at, strict=True):
        assert died >= target and resumed % SAVE_EVERY == 0 and died - SAVE_EVERY <= resumed <= died
    assert deaths[0][0] < deaths[1][0]
    assert json.loads((chaos / "run.json").read_text())["status"] == "finished"
    assert _same(_weights(tmp_path / "straight"), _weights(chaos)), "restarted run differs from the straight one"

    if nproc == 1:  # the negative control: the same faults, the RNG streams not restored
        control = tmp_path / "control"
        control_args = _args(stdlib_tokenizer_dir, tmp_path, "control", "run.if_exists=resume")
        _chaos(_torchrun(1, ["--no-rng-restore", *control_args], restarts=2, script=True), control, kill_at, rng)
        assert [e["event"] for e in _events(control) if e.get("event") in ("start", "resume")] == \
            ["start", "resume", "resume"]
        assert not _same(_weights(tmp_path / "straight"), _weights(control)), \
            "without the RNG states the run should differ: the comparison above proves nothing"


@pytest.mark.slow
def test_a_save_killed_halfway_resumes_from_the_previous_checkpoint(stdlib_tokenizer_dir, tmp_path):
    straight = subprocess.run([sys.executable, "-m", "lmlab.cli", *_args(stdlib_tokenizer_dir, tmp_path, "straight")],
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "torn"
    died = subprocess.run([sys.executable, str(HERE), "--die-while-saving", "12",
                           *_args(stdlib_tokenizer_dir, tmp_path, "torn")], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    ckpts = run / "checkpoints"
    torn = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    assert torn and not (ckpts / "step-00000012").exists(), "the save was not cut halfway"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000008"]

    resumed = subprocess.run([sys.executable, "-m", "lmlab.cli", "resume", str(run)], env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed   from step-00000008" in resumed.stdout
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "the torn temporary folder was left"
    assert _same(_weights(tmp_path / "straight"), _weights(run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_first_worker(rank: int, port: int, case: str, out: str) -> None:
    import torch.distributed as dist

    from lmlab.errors import LmlabError
    from lmlab.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails the test, not hangs it
    rt = Runtime(torch.device("cpu"), "fp32", rank=rank, world_size=2)

    def fn():
        if case == "user" and rt.is_main:
            raise LmlabError("runs/x already exists")
        if case == "bug" and rt.is_main:
            raise ZeroDivisionError("division by zero\nmore lines")
        return f"made by rank {rt.rank}"

    try:
        got = ("ok", rt.main_first(fn))
    except LmlabError as e:
        got = ("LmlabError", str(e))
    except ZeroDivisionError as e:
        got = ("ZeroDivisionError", str(e))
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["ok", "user", "bug"])
@pytest.mark.slow
def test_a_failure_on_rank_0_alone_reaches_every_rank(tmp_path, case):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_main_first_worker, args=(_free_port(), case, str(tmp_path)), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.time() + 180
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank is still waiting: the failure did not reach it")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    if case == "ok":
        assert got == [["ok", "made by rank 0"], ["ok", "made by rank 1"]]
    elif case == "user":
        assert got == [["LmlabError", "runs/x already exists"],
                       ["LmlabError", "rank 1 stops: rank 0 failed: runs/x already exists"]]
    else:  # a bug keeps its own exception (and traceback) on rank 0; the others get one line
        assert got == [["ZeroDivisionError", "division by zero\nmore lines"],
                       ["LmlabError", "rank 1 stops: rank 0 failed: ZeroDivisionError: division by zero"]]


@pytest.mark.slow
def test_an_existing_run_folder_stops_both_ranks_with_one_line(stdlib_tokenizer_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("somebody's")
    t0 = time.time()
    res = subprocess.run(_torchrun(2, _args(stdlib_tokenizer_dir, tmp_path, "taken")), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and time.time() - t0 < 120  # nobody waits for a collective that never comes
    # rank 0 says it in one line; rank 1 says the same or is stopped by torchrun first, whichever comes first
    assert "lmlab pretrain: error: run folder" in res.stderr and "already exists" in res.stderr
    assert "lmlab/" not in res.stderr  # no traceback from lmlab's code (torchrun prints its own summary)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]  # nothing written into it


def test_a_lock_left_by_an_earlier_attempt_of_the_same_torchrun_job_is_taken_over(tmp_path, monkeypatch):
    from lmlab.errors import LmlabError
    from lmlab.train.run import LOCK, acquire_lock, release_lock

    def held_by(job, attempt):
        (tmp_path / LOCK).write_text(json.dumps({"pid": 4242, "host": "node-7", "since": "then", "job": job,
                                                 "attempt": attempt}))

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    held_by("job-1", 0)  # rank 0 of the attempt before, on another node: torchrun ended it before restarting
    acquire_lock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    release_lock(tmp_path)
    for job, attempt in (("job-2", 0), ("job-1", 1)):  # another job, or this very attempt: somebody else's
        held_by(job, attempt)
        with pytest.raises(LmlabError, match="in use by pid 4242 on node-7"):
            acquire_lock(tmp_path)


def test_a_start_killed_before_its_config_was_written_is_cleared_for_the_restart(tmp_path):
    from lmlab.train.run import LOCK, clear_unstarted

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "r"
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.json").write_text("{")
    for name in ("run.json", "metrics.jsonl"):
        (run / name).write_text("")
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    clear_unstarted(run)
    assert list(run.iterdir()) == []
    (run / "config.yaml").write_text("model: {}")  # a run: left alone
    (run / "metrics.jsonl").write_text("")
    clear_unstarted(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
    (run / "config.yaml").unlink()
    (run / "notes.txt").write_text("mine")  # something lmlab did not write: left alone
    clear_unstarted(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "notes.txt"]


def test_the_same_command_again_after_the_run_finished_does_nothing(stdlib_tokenizer_dir, tmp_path):
    from lmlab.config import load_config
    from lmlab.train.loop import train

    args = _args(stdlib_tokenizer_dir, tmp_path, "once", "run.if_exists=resume", "train.max_steps=4",
                 "model.dropout=0.0")
    cfg = lambda: load_config(None, args[1:])  # noqa: E731
    threads = torch.get_num_threads()
    try:
        run = train(cfg(), echo=lambda *a: None)
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        said = []
        assert train(cfg(), echo=said.append) == run
    finally:
        torch.set_num_threads(threads)
    assert said and "finished already; nothing to do" in said[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten


if __name__ == "__main__":
    sys.exit(_cli_with_fault(sys.argv[1:]))
