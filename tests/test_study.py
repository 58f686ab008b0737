"""Studies: grid → cells, the local queue's GPU groups, dry-run, kill + re-run (exact resume), slurm via submitit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmlab.config import save_config
from lmlab.errors import ConfigError
from lmlab.study import load_study, run_study, study_from_dict
from lmlab.study.local import LocalExecutor

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
TINY_MAMBA = {"name": "mamba-swelu-tiny", "d_model": 32, "n_layers": 2, "dense_hidden": 32}


def _grid_study(tmp_path, **extra) -> dict:
    return {"name": "g", "out_dir": str(tmp_path / "g"), "config": {"model": {"name": "mamba-swelu-tiny",
                                                                              "d_model": 32, "n_layers": 2}},
            "grid": {"seed": [1, 2], "model": {"swelu": {}, "silu": {"model.activation": "silu"}},
                     "budget": [20, 100], "data": ["stdlib"]}, **extra}


def test_grid_expands_data_budget_model_seed_into_named_validated_cells(tmp_path):
    s = study_from_dict(_grid_study(tmp_path, gpus=[0, 1, 2, 3, 4, 5], gpus_per_run=2, runs=[
        {"name": "wiki-100x", "gpus": [4, 5], "set": {"data": {"source": "wiki/"}, "train.token_ratio": 100}}]))
    names = [c.name for c in s.cells]
    assert len(names) == 9 and len(set(names)) == 9
    assert names[:3] == ["stdlib-20x-swelu-s1", "stdlib-20x-swelu-s2", "stdlib-20x-silu-s1"]
    c = s.cells[2]
    assert c.labels == {"data": "stdlib", "budget": "20x", "model": "silu", "seed": "s1"}
    assert c.config.model.overrides["activation"] == "silu" and c.config.train.seed == 1
    assert c.config.train.token_ratio == 20 and c.config.run.name == c.name
    assert c.run_dir == tmp_path / "g" / c.name and c.gpus is None and c.gpus_per_run == 2
    wiki = s.cells[-1]
    assert wiki.gpus == (4, 5) and wiki.config.data.source == "wiki/" and wiki.config.train.token_ratio == 100
    assert s.cells[4].config.train.token_ratio == 100  # budget 100x after the two seeds × two models

    with pytest.raises(ConfigError, match=r"run stdlib-20x-swelu-s1: train.lr"):
        study_from_dict(_grid_study(tmp_path, config={"train": {"lr": -1}}))
    with pytest.raises(ConfigError, match="unknown key 'grids'"):
        study_from_dict({"grids": {}})
    with pytest.raises(ConfigError, match="two runs are named"):
        study_from_dict({"runs": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="gpus_per_run"):
        study_from_dict({"gpus": [0, 1], "runs": [{"name": "a", "gpus": [0], "gpus_per_run": 2}]})


class _FakeProc:
    """Runs for a few polls, then marks its run folder finished."""

    live: list = []
    next_pid = 10_000

    def __init__(self, cmd, env, run_dir):
        self.cmd, self.env, self.run_dir, self.polls = cmd, env, run_dir, 0
        self.pid = _FakeProc.next_pid = _FakeProc.next_pid + 1

    def poll(self):
        self.polls += 1
        if self.polls < 3:
            return None
        if self in _FakeProc.live:
            _FakeProc.live.remove(self)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "run.json").write_text(json.dumps({"status": "finished"}))
        return 0

    def send_signal(self, sig):
        pass


def test_local_executor_hands_out_disjoint_gpu_groups_and_skips_or_resumes_by_folder(tmp_path):
    raw = {"name": "q", "out_dir": str(tmp_path / "q"), "config": {"model": TINY_MAMBA}, "gpus": [0, 1, 2, 3, 4, 5],
           "gpus_per_run": 2, "grid": {"seed": [1, 2, 3, 4, 5]},
           "runs": [{"name": "pinned", "gpus": [4, 5]}, {"name": "single", "gpus_per_run": 1}]}
    study = study_from_dict(raw)
    done = tmp_path / "q" / "s2"  # finished before: skipped
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"status": "finished", "sessions": [{}]}))
    killed = tmp_path / "q" / "s3"  # killed mid-way: resumed
    killed.mkdir(parents=True)
    save_config(study.cells[2].config, killed / "config.yaml")
    (killed / "run.json").write_text(json.dumps({"status": "running", "pid": 999_999_999}))

    launched, overlaps = [], []

    def launcher(cmd, env, log):
        group = {int(g) for g in env["CUDA_VISIBLE_DEVICES"].split(",")}
        busy = [g for p in _FakeProc.live for g in p.env["CUDA_VISIBLE_DEVICES"].split(",")]
        overlaps.extend(g for g in busy if int(g) in group)
        assert len(_FakeProc.live) < 2  # max_parallel
        name = Path(cmd[-1]).stem if cmd[-3] == "pretrain" else Path(cmd[-1]).name
        p = _FakeProc(cmd, env, tmp_path / "q" / name)
        _FakeProc.live.append(p)
        launched.append((name, cmd, env["CUDA_VISIBLE_DEVICES"]))
        return p

    lines = []
    results = LocalExecutor(max_parallel=2, launcher=launcher, poll_s=0.001).run(study, echo=lines.append)
    assert results == dict.fromkeys(["s1", "s2", "s3", "s4", "s5", "pinned", "single"], "finished")
    assert not overlaps
    by_name = {n: (cmd, g) for n, cmd, g in launched}
    assert set(by_name) == {"s1", "s3", "s4", "s5", "pinned", "single"}  # s2 was finished: not launched
    assert by_name["pinned"][1] == "4,5" and len(by_name["single"][1].split(",")) == 1
    cmd = by_name["s1"][0]
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:8] == ["-m", "lmlab.cli", "pretrain"] and cmd[-1].endswith(".cells/s1.yaml")
    assert by_name["s3"][0][-2:] == ["resume", str(killed)]
    assert by_name["single"][0][:4] == [sys.executable, "-m", "lmlab.cli", "pretrain"]  # one GPU: no torchrun
    assert any(line.startswith("skipped   s2") for line in lines)
    assert any(line.startswith("resumed   s3") for line in lines)


def test_dry_run_prints_cells_plan_and_schedule_and_writes_nothing(tmp_path, capsys):
    from lmlab.commands.study import main

    path = tmp_path / "s.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump({
        "name": "plan", "out_dir": str(out), "hardware": "h100", "gpus": [0, 1, 2, 3, 4, 5], "gpus_per_run": 2,
        "config": {"model": {"name": "mamba-swelu-small"}, "data": {"seq_len": 256}},
        "grid": {"budget": {"20x": 20, "100x": 100}}, "runs": [{"name": "wiki", "gpus": [4, 5],
                                                                "set": {"train.token_ratio": 100}}]}))
    assert main([str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "20x" in text and "100x" in text and "wiki" in text and "schedule" in text
    assert "GiB" in text and "GPU-h" in text and "GPUs 0,1" in text and "GPUs 4,5" in text
    assert "USD" in text  # cost from the hardware table
    assert not out.exists()


def _tiny_study(tmp_path, tok, runs, **extra) -> Path:
    cfg = {"model": {"name": "mamba-swelu-tiny", "d_model": 32, "n_layers": 2, "dense_hidden": 32},
           "data": {"source": "stdlib", "max_docs": 60, "tokenizer": str(tok), "seq_len": 32},
           "train": {"batch_size": 4, "threads": 1, "progress": False, "save_every": 4, "eval_every": 8,
                     "eval_batches": 2, "log_every": 2, "sample_tokens": 4, "warmup_steps": 4, "lr": 3e-3}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "out_dir": str(tmp_path / "study"), "config": cfg,
                                    "runs": runs, **extra}))
    return path


def _manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _study_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "lmlab.commands.study", str(path), "--max-parallel", "1"]


@pytest.mark.slow
def test_killing_the_study_and_rerunning_it_skips_finished_runs_and_resumes_exactly(stdlib_tokenizer_dir, tmp_path):
    """A real 2-run study through subprocesses: SIGKILL the study and its runs mid-way, start it again."""
    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "a", "set": {"train.max_steps": 4}},
                                                 {"name": "b", "set": {"train.max_steps": 40}}])
    b_cfg = load_study(path).cells[1].config
    b_cfg.run.out_dir, b_cfg.run.name = str(tmp_path / "straight"), "b"
    save_config(b_cfg, tmp_path / "b.yaml")
    straight = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "pretrain", "-c", str(tmp_path / "b.yaml")],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    study = subprocess.Popen(_study_cmd(path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own process group: the study and its runs
    a, b = tmp_path / "study" / "a", tmp_path / "study" / "b"
    deadline = time.time() + 300
    while time.time() < deadline and study.poll() is None:
        ckpts = [int(p.name.split("-")[1]) for p in (b / "checkpoints").glob("step-*")
                 if (p / "MANIFEST.json").exists()]
        if max(ckpts, default=0) >= 12:
            break
        time.sleep(0.02)
    assert study.poll() is None, study.communicate()[0].decode()[-3000:]
    os.kill(_manifest(b)["pid"], signal.SIGKILL)  # the run first (it has a session of its own), then the study
    os.killpg(study.pid, signal.SIGKILL)
    study.wait()
    assert _manifest(a)["status"] == "finished" and len(_manifest(a)["sessions"]) == 1
    assert _manifest(b)["status"] == "running" and not (b / "final").exists()  # died without a word

    again = subprocess.run(_study_cmd(path), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped   a (already finished)" in again.stdout
    assert "resumed   b on CPU" in again.stdout
    assert len(_manifest(a)["sessions"]) == 1  # not redone
    assert _manifest(b)["status"] == "finished" and len(_manifest(b)["sessions"]) == 2
    events = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"][0] >= 12

    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-3000:]
    w1, w2 = load_file(str(tmp_path / "straight" / "b" / "final" / "model.safetensors")), \
        load_file(str(b / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # a third run has nothing to do
    third = subprocess.run(_study_cmd(path), env=ENV, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.count("skipped") == 2
    assert (tmp_path / "study" / "study.yaml").is_file()  # what `lmlab report` reads price and hardware from


@pytest.mark.slow
def test_slurm_executor_runs_a_job_array_through_submitit_and_requeues_from_the_checkpoint(stdlib_tokenizer_dir,
                                                                                            tmp_path):
    import pickle

    from submitit.helpers import DelayedSubmission

    from lmlab.study.slurm import CellJob, SlurmExecutor

    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "x", "set": {"train.max_steps": 2}},
                                                 {"name": "y", "set": {"train.max_steps": 2, "train.seed": 7}}],
                       slurm={"partition": "gpu", "timeout_min": 10})
    study = load_study(path)
    lines = []
    results = run_study(study, SlurmExecutor(cluster="local"), echo=lines.append)
    assert results == {"x": "finished", "y": "finished"}, lines
    submitted = [line for line in lines if line.startswith("submitted")]
    assert len(submitted) == 2  # one batch: a job array on Slurm
    again = run_study(study, SlurmExecutor(cluster="local"), echo=lines.append)
    assert again == {"x": "finished", "y": "finished"}
    assert len(_manifest(study.cells[0].run_dir)["sessions"]) == 1

    # preemption: the checkpoint hook hands back the same cell, picklable, to requeue
    job = CellJob(study.cells[1], study.out_dir)
    job._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    resubmit = job.__submitit_checkpoint__()
    assert job._proc.poll() is not None  # the running process was told to stop
    assert isinstance(resubmit, DelayedSubmission) and isinstance(resubmit.function, CellJob)
    clone = pickle.loads(pickle.dumps(resubmit.function))
    assert clone.cell.name == "y" and clone._proc is None and clone() == "finished"  # already done: no work


@pytest.mark.slow
def test_ray_executor_runs_each_cell_as_a_task(stdlib_tokenizer_dir, tmp_path):
    ray = pytest.importorskip("ray")
    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "r", "set": {"train.max_steps": 2}}])
    try:
        results = run_study(load_study(path), "ray", echo=lambda s: None,
                            init_kwargs={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    finally:
        ray.shutdown()
    assert results == {"r": "finished"}


def test_slurm_executor_without_slurm_refuses_in_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "out_dir": str(tmp_path / "out"),
                                    "config": {"model": TINY_MAMBA}, "runs": [{"name": "a"}]}))
    no_slurm = [d for d in ENV.get("PATH", "").split(os.pathsep) if not os.path.isfile(os.path.join(d, "sbatch"))]
    env = {**ENV, "PATH": os.pathsep.join(no_slurm)}
    p = subprocess.run([sys.executable, "-m", "lmlab.cli", "study", str(path), "--executor", "slurm"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and "no sbatch on PATH" in errors[0] and "--executor local" in errors[0], p.stderr
    assert "submitted" not in p.stdout and not (tmp_path / "out").exists()  # no local fallback, no .slurm/%j


def _stop_study_with(path: Path, signals: list[int], grace: float = 0.0) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a one-run study, wait for the run's first checkpoint, send `signals` to the study's pid alone; the
    run's process must be gone when the study has exited (or `grace` seconds later)."""
    study = subprocess.Popen(_study_cmd(path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    run = path.parent / "study" / "long"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and study.poll() is None and not list(run.glob("checkpoints/*/MANIFEST.json")):
            time.sleep(0.05)
        assert study.poll() is None, study.communicate()[0].decode()[-3000:]
        cell_pid = _manifest(run)["pid"]
        for sig in signals:
            os.kill(study.pid, sig)  # the study's pid, not its process group
            time.sleep(0.05)
        out = study.communicate(timeout=120)[0].decode()
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
    from lmlab.monitor.runread import pid_alive

    deadline = time.time() + grace
    while time.time() < deadline and pid_alive(cell_pid):
        time.sleep(0.1)
    assert not pid_alive(cell_pid), f"the run (pid {cell_pid}) outlived the study:\n{out}"
    return subprocess.CompletedProcess(study.args, study.returncode, out), run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_study_pid_stops_its_runs_after_they_save(stdlib_tokenizer_dir, tmp_path, sig):
    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "long", "set": {"train.max_steps": 5000}}])
    res, run = _stop_study_with(path, [sig])
    assert "stopped   long" in res.stdout and "study stopped" in res.stdout, res.stdout
    m = _manifest(run)
    assert m["status"] == "stopped"
    steps = [int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/*/MANIFEST.json")]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stopped = [e["step"] for e in events if e.get("event") == "stopped"]
    assert stopped and max(steps) == stopped[-1] < 5000  # saved where it stopped


@pytest.mark.slow
def test_a_second_sigint_does_not_leave_a_run_behind(stdlib_tokenizer_dir, tmp_path):
    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "long", "set": {"train.max_steps": 5000}}])
    res, run = _stop_study_with(path, [signal.SIGINT, signal.SIGINT])
    assert "study stopped" in res.stdout, res.stdout  # the study waited for its run (checked: no process left)
    assert _manifest(run)["status"] != "running"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_does_not_leave_its_run_training(stdlib_tokenizer_dir, tmp_path):
    """SIGKILL to the study alone (nothing forwarded): its run is told to save and stop all the same."""
    path = _tiny_study(tmp_path, stdlib_tokenizer_dir, [{"name": "long", "set": {"train.max_steps": 5000}}])
    res, run = _stop_study_with(path, [signal.SIGKILL], grace=60)
    assert _manifest(run)["status"] == "stopped"  # it saved and stopped
