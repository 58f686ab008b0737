"""The readers (status, watch, doctor, plot, report) on run folders the real trainer wrote (tests/fixture_runs.py):
a finished run, a run that diverged with the guard off (NaN as "nan" strings), one the guard stopped, one killed
with SIGKILL; then copies changed the way newer trainers write them (null validation values, a `stopped` status
with its reason, an objective's own metrics), and a study folder with no run yet. Also: a training run of an
evaluation-only model size is refused through the CLI before any work. The commands run in this process
(`lmlab.cli.main`), as the CLI runs them."""

import asyncio
import json
import math
import random
import re
import time

import pytest
from fixture_runs import copy_run
from readers_fixtures import lmlab, rewrite  # noqa: F401  (lmlab: a fixture, used by name)

from lmlab import runs
from lmlab.monitor import doctor


@pytest.fixture
def _status_json(lmlab):  # noqa: F811
    def read(*paths) -> list[dict]:
        res = lmlab("status", "--json", *paths)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    return read


def _findings(lmlab, run) -> list[str]:  # noqa: F811
    """The codes of `lmlab doctor`'s warnings and errors on `run`, but a throughput drop: these runs share a loaded
    machine with the rest of the test session, so their tokens/s follow the machine, not the run."""
    res = lmlab("doctor", "--json", run)
    codes = [f["code"] for f in json.loads(res.stdout)[0]["findings"] if f["severity"] in ("warning", "error")]
    assert res.returncode == (1 if codes else 0), res.stdout
    return [c for c in codes if c != "throughput"]


# ----------------------------------------------------------------------------------------------- a healthy run
def test_a_finished_run_reads_everywhere(pretrain_run, lmlab, _status_json, tmp_path):  # noqa: F811
    run = pretrain_run
    (s,) = _status_json(run)
    assert s["status"] == "finished" and s["step"] == 10 and s["total_steps"] == 10 and not s["diverged"]
    assert math.isfinite(s["val_loss"]) and s["val_loss"] > 0 and s["objective"] == {}
    assert s["n_checkpoints"] == 2 and s["last_checkpoint"] == "step-00000010" and s["has_final"]
    assert s["tokens"] == 10 * 4 * 32 and s["alive"] is None and s["restarts"] == 0
    assert _findings(lmlab, run) == []  # a healthy run: no warning, no error
    res = lmlab("plot", run, "-o", tmp_path / "p.png")
    assert res.returncode == 0 and (tmp_path / "p.png").stat().st_size > 1000, res.stderr
    res = lmlab("report", run, "-o", tmp_path / "r" / "report.html")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| pretrain |" in md and "| finished |" in md


# ------------------------------------------------------------------------------------------------ diverged runs
def test_report_status_doctor_and_plot_on_a_run_that_diverged_with_the_guard_off(diverged_runs, pretrain_run, lmlab,  # noqa: F811
                                                                                  _status_json, tmp_path):
    run, healthy = diverged_runs["nan"], pretrain_run
    assert '"nan"' in (run / "metrics.jsonl").read_text()  # what the trainer writes for NaN
    res = lmlab("report", healthy, run, "-o", tmp_path / "r" / "report.html")
    assert res.returncode == 0, res.stderr  # it crashed comparing "nan" with numbers
    md = (tmp_path / "r" / "report.md").read_text()
    cells = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| nan |")).split("|")]
    assert cells[8:11] == ["nan", "nan", "nan"] and "diverged" in cells[11]  # losses, ppl; status (diverged)
    import csv

    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "r" / "results.csv"))}
    assert rows["nan"]["diverged"] == "True" and rows["pretrain"]["diverged"] == "False"
    (s,) = _status_json(run)
    assert s["diverged"]
    assert "diverged" in lmlab("status", run).stdout.splitlines()[0]
    res = lmlab("doctor", "--json", run)
    assert res.returncode == 1
    finding = json.loads(res.stdout)[0]["findings"][0]
    assert finding["code"] == "nan"
    first_bad = next(r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if r.get("kind") == "train" and not all(math.isfinite(float(r[k])) for k in ("loss", "grad_norm")))
    assert f"at step {first_bad:,}" in finding["message"]
    assert lmlab("plot", run, "-o", tmp_path / "n.png").returncode == 0


def test_doctor_on_a_guard_stopped_run_uses_the_guards_step_and_the_trainers_lr(diverged_runs, lmlab):  # noqa: F811
    run = diverged_runs["guard_stop"]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    guard = [e for e in events if e.get("event") == "guard"]
    assert guard and guard[-1]["action"] == "stop"
    said = re.search(r"train\.lr=(\S+)", diverged_runs["guard_message"]).group(1)  # the trainer's suggestion
    res = lmlab("doctor", "--json", run)
    assert res.returncode == 1
    f = json.loads(res.stdout)[0]["findings"][0]
    assert f["code"] == "nan" and f"at step {guard[0]['step']:,}" in f["message"]
    assert f"train.lr={said}`" in f["advice"]
    ckpts = runs.checkpoints(run)
    assert ckpts and f"({ckpts[-1].name})" in f["advice"]  # the good state the guard saved, not 'the start'
    out = lmlab("status", run).stdout
    assert "guard stop at step" in out and "(diverged)" in out


def test_a_stopped_status_with_its_reason_is_shown_by_every_reader(diverged_runs, lmlab, _status_json,  # noqa: F811
                                                                    tmp_path):
    """run.json as the trainer writes it after a guard stop: status stopped, the reason, the resume command."""
    run = copy_run(diverged_runs["guard_stop"], tmp_path / "stopped")
    m = json.loads((run / "run.json").read_text())
    m.update(status="stopped", stop_reason="loss is nan at step 2",
             resume_command=f"lmlab resume {run} train.lr=500000")
    (run / "run.json").write_text(json.dumps(m))
    (s,) = _status_json(run)
    assert s["status"] == "stopped" and s["stop_reason"] == "loss is nan at step 2"
    assert s["resume_command"] == f"lmlab resume {run} train.lr=500000"
    text = lmlab("status", run).stdout
    assert "stopped (diverged)" in text and "loss is nan at step 2" in text and "train.lr=500000" in text
    res = lmlab("doctor", run)
    assert "stopped (diverged)" in res.stdout and f"`lmlab resume {run} train.lr=500000`" in res.stdout
    res = lmlab("report", run, "-o", tmp_path / "r" / "report.html")
    assert res.returncode == 0 and "stopped (diverged)" in (tmp_path / "r" / "report.md").read_text()

    from lmlab.monitor.watch import WatchApp

    async def drive():
        app = WatchApp([run], interval=60, gpus=False)
        async with app.run_test(size=(200, 48)) as pilot:
            await pilot.pause()
            title = str(app.query_one("#title").content)
            assert "loss is nan at step 2" in title and "train.lr=500000" in title
            assert str(app.query_one("#runs").get_cell(str(run), "status")) == "stopped (diverged)"

    asyncio.run(drive())


# ------------------------------------------------------------------------------------ no validation data: no value
def test_null_validation_values_show_as_nothing_never_zero(pretrain_run, lmlab, _status_json, tmp_path):  # noqa: F811
    run = copy_run(pretrain_run, tmp_path / "noval")
    rewrite(run, lambda r: {**r, "val_loss": None, "val_ppl": None} if r.get("kind") == "eval" else r)
    m = json.loads((run / "run.json").read_text())
    m["summary"] = {**m.get("summary", {}), "val_loss": None, "val_ppl": None}
    (run / "run.json").write_text(json.dumps(m))
    (s,) = _status_json(run)
    assert s["val_loss"] is None and s["val_ppl"] is None
    text = lmlab("status", run).stdout
    assert re.search(r"val -\s*$", text, re.M) and "val 0" not in text
    assert _findings(lmlab, run) == [] and "val loss" not in lmlab("doctor", run).stdout.splitlines()[0]
    assert lmlab("plot", run, "-o", tmp_path / "p.png").returncode == 0
    assert lmlab("report", run, "-o", tmp_path / "r" / "report.html").returncode == 0
    row = next(line for line in (tmp_path / "r" / "report.md").read_text().splitlines()
               if line.startswith("| noval |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8] == "—" and cells[9] == "—"  # final val loss, val ppl
    # records without the keys at all read the same
    rewrite(run, lambda r: {k: v for k, v in r.items() if k not in ("val_loss", "val_ppl")})
    assert _status_json(run)[0]["val_loss"] is None


# ------------------------------------------------------------------------------ an objective's own metrics
def test_objective_metrics_appear_in_status_watch_and_report(pretrain_run, lmlab, _status_json, tmp_path):  # noqa: F811
    run = copy_run(pretrain_run, tmp_path / "grpo")

    def add(r):
        if r.get("kind") == "train":
            r.update({"reward": 0.25 + r["step"] / 100, "reward_std": 0.1, "kl": 0.0125, "completion_length": 31.0,
                      "clip_ratio": 0.0, "rewards/format": 0.5})
        return r

    rewrite(run, add)
    (s,) = _status_json(run)
    assert s["objective"]["reward"] == pytest.approx(0.35) and s["objective"]["rewards/format"] == 0.5
    text = lmlab("status", run).stdout
    assert "objective   reward 0.35  reward_std 0.1  kl 0.0125" in text
    assert lmlab("report", run, pretrain_run, "-o", tmp_path / "r" / "report.html").returncode == 0
    md = (tmp_path / "r" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| run | objective |"))
    assert head.split("|")[3:9] == [" reward ", " reward_std ", " kl ", " completion_length ", " clip_ratio ",
                                    " rewards/format "]
    grpo_row = next(line for line in md.splitlines() if line.startswith("| grpo | pretrain | 0.35 |"))
    assert grpo_row and re.search(r"^\| pretrain \| pretrain \| — \| — \|", md, re.M)

    from lmlab.monitor.watch import WatchApp

    async def drive():
        app = WatchApp([run, pretrain_run], interval=60, gpus=False)
        async with app.run_test(size=(220, 48)) as pilot:
            await pilot.pause()
            table = app.query_one("#runs")
            assert str(table.get_cell(str(run), "objective")).startswith("reward 0.35  reward_std 0.1")
            assert str(table.get_cell(str(pretrain_run), "objective")) == ""

    asyncio.run(drive())


# ------------------------------------------------------------------------------------ a study with no run yet
def test_status_and_watch_on_a_study_folder_with_no_run_yet(pretrain_run, lmlab, tmp_path, monkeypatch):  # noqa: F811
    study = tmp_path / "study"
    (study / ".cells").mkdir(parents=True)
    (study / "study.yaml").write_text("name: s\n")
    res = lmlab("status", study)
    assert res.returncode == 0 and "no runs yet" in res.stdout, res.stdout + res.stderr
    assert lmlab("status", tmp_path / "missing").returncode == 2  # a folder that is not there is still an error

    import argparse

    from lmlab.commands import watch as watch_cmd
    from lmlab.monitor.watch import WatchApp

    calls = []
    monkeypatch.setattr("lmlab.monitor.watch.watch", lambda paths, **kw: calls.append(paths))  # the UI: below
    p = argparse.ArgumentParser()
    watch_cmd.add_arguments(p)
    assert watch_cmd.run(p.parse_args([str(study)])) == 0 and calls == [[str(study)]]  # it opened

    async def drive():
        app = WatchApp([study], interval=0.2, gpus=False)
        async with app.run_test(size=(200, 48)) as pilot:
            await pilot.pause()
            assert app.query_one("#runs").row_count == 0
            assert "waiting" in str(app.query_one("#title").content)
            copy_run(pretrain_run, study / "cell-a")
            for _ in range(50):
                await pilot.pause(0.1)
                if app.query_one("#runs").row_count:
                    break
            assert app.query_one("#runs").row_count == 1
            assert "cell-a" in str(app.query_one("#title").content)

    asyncio.run(drive())


# ------------------------------------------------------------------------------------ doctor on real healthy runs
def test_doctor_spike_and_stall_rules_on_a_real_run_with_injected_faults(pretrain_run, tmp_path):
    """The real run's records, lengthened to 200 by replaying its noise: nothing; the same with spikes
    injected: spikes (and nothing else); the same stuck at a flat loss: stalled, listed first."""
    src = [json.loads(x) for x in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in src if r.get("kind") == "train"]
    noise = [r["loss"] / train[-1]["loss"] for r in train[-5:]]
    norms = [r["grad_norm"] for r in train]
    assert len(train) == 10 and all(math.isfinite(x) for x in norms)

    def write(name, loss, norm):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text("train:\n  warmup_steps: 2\n  log_every: 1\ndata:\n  vocab_size: 512\n")
        with open(run / "metrics.jsonl", "w") as f:
            for i in range(200):
                f.write(json.dumps({"kind": "train", "step": i + 1, "time": time.time(), "loss": loss(i),
                                    "grad_norm": norm(i), "lr": 3e-3, "tok_s": 5000.0}) + "\n")
        return run

    rng = random.Random(0)
    jitter = [math.exp(rng.gauss(0, 0.25)) for _ in range(200)]  # grad norms vary ~25 % from step to step

    def healthy_loss(i):
        return (3.0 + 3.4 * math.exp(-i / 60)) * noise[i % len(noise)] * (1 + 0.01 * rng.gauss(0, 1))

    def healthy_norm(i):
        return norms[-1] * jitter[i]

    assert doctor.diagnose(write("ok", healthy_loss, healthy_norm)) == []
    spiky = write("spiky", lambda i: healthy_loss(i) * (1.6 if i in (120, 170) else 1),
                  lambda i: healthy_norm(i) * (6 if i in (120, 170) else 1))
    assert [f.code for f in doctor.diagnose(spiky)] == ["spikes"]
    stuck = write("stuck", lambda i: 6.3 + 0.3 * math.exp(-i / 10) + 0.01 * (i % 3),
                  lambda i: healthy_norm(i) * (6 if i in (120, 170) else 1))
    codes = [f.code for f in doctor.diagnose(stuck)]
    assert codes[0] == "stalled" and "spikes" in codes


# ------------------------------------------------------------------------------------ refusals before any work
@pytest.mark.slow  # ~7 s on 2 loaded cores
def test_training_an_evaluation_only_size_is_refused_in_one_line_before_any_work(lmlab, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    res = lmlab("pretrain", "--model", "inl-tiny-v0", f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=2")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert len(errors) == 1 and "inl-tiny-v0 cannot be trained" in errors[0], res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no run folder, no data
    assert lmlab("models", "--family", "inl").returncode == 0  # listing (and evaluating) it still works


# ------------------------------------------------------------------------------------------------ a killed run
@pytest.mark.slow  # the killed trainer is a process of its own (~15 s on 2 loaded cores)
def test_a_run_killed_with_sigkill_reads_as_dead_with_its_resume_command(killed_run, lmlab, _status_json):  # noqa: F811
    (s,) = _status_json(killed_run)
    assert s["status"] == "running" and s["alive"] is False and not s["has_final"]
    assert s["last_checkpoint_step"] >= 5 and s["step"] >= s["last_checkpoint_step"] and s["eta_s"] is not None
    assert "killed  running (dead)" in lmlab("status", killed_run).stdout
    res = lmlab("doctor", "--json", killed_run)
    dead = next(f for f in json.loads(res.stdout)[0]["findings"] if f["code"] == "dead")
    assert res.returncode == 1 and dead["severity"] == "error" and f"lmlab resume {killed_run}" in dead["advice"]

    from lmlab.monitor.watch import WatchApp

    async def drive():
        app = WatchApp([killed_run], interval=60, gpus=False)
        async with app.run_test(size=(200, 48)) as pilot:
            await pilot.pause()
            assert str(app.query_one("#runs").get_cell(str(killed_run), "status")) == "running (dead)"

    asyncio.run(drive())
