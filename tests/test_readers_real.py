"""The readers (status, watch, doctor, plot, report) on run folders the real trainer wrote: a healthy run, a run
that diverged with the guard off (NaN as "nan" strings), one the guard stopped; then the same folders changed the
way newer trainers write them (null validation values, a `stopped` status with its reason, an objective's own
metrics), and a study folder with no run yet. Also: a training run of an evaluation-only model size is refused
through the CLI before any work."""

import asyncio
import json
import math
import random
import re
import time

import pytest
import readers_fixtures
from readers_fixtures import ENV, cli, copy_run

from lmlab.monitor import doctor, runread

real_runs = readers_fixtures.real_runs  # the session fixture, used here by name

pytestmark = pytest.mark.slow  # the fixture trains three tiny runs (~1 min on 2 CPU cores)


def _rewrite(run, fn) -> None:
    """Apply `fn` to each record of metrics.jsonl (it returns the record, or None to drop it)."""
    path = run / "metrics.jsonl"
    recs = [fn(json.loads(x)) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs if r is not None))


def _status_json(*runs) -> list[dict]:
    res = cli("status", "--json", *runs)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# ----------------------------------------------------------------------------------------------- a healthy run
def test_healthy_real_run_reads_everywhere(real_runs, tmp_path):
    run = real_runs["healthy"]
    (s,) = _status_json(run)
    assert s["status"] == "finished" and s["step"] == 10 and s["total_steps"] == 10 and not s["diverged"]
    assert math.isfinite(s["val_loss"]) and s["val_loss"] > 0 and s["n_checkpoints"] >= 1 and s["objective"] == {}
    res = cli("doctor", run)
    assert res.returncode == 0, res.stdout  # a healthy run: no warning, no error
    res = cli("plot", run, "-o", tmp_path / "p.png")
    assert res.returncode == 0 and (tmp_path / "p.png").stat().st_size > 1000, res.stderr
    res = cli("report", run, "-o", tmp_path / "r" / "report.html")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| healthy |" in md and "| finished |" in md


# ------------------------------------------------------------------------------------------------ diverged runs
def test_report_status_doctor_and_plot_on_a_run_that_diverged_with_the_guard_off(real_runs, tmp_path):
    run, healthy = real_runs["nan"], real_runs["healthy"]
    assert '"nan"' in (run / "metrics.jsonl").read_text()  # what the trainer writes for NaN
    res = cli("report", healthy, run, "-o", tmp_path / "r" / "report.html")
    assert res.returncode == 0, res.stderr  # it crashed comparing "nan" with numbers
    md = (tmp_path / "r" / "report.md").read_text()
    cells = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| nan |")).split("|")]
    assert cells[8:11] == ["nan", "nan", "nan"] and "diverged" in cells[11]  # losses, ppl; status (diverged)
    import csv

    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "r" / "results.csv"))}
    assert rows["nan"]["diverged"] == "True" and rows["healthy"]["diverged"] == "False"
    (s,) = _status_json(run)
    assert s["diverged"]
    assert "diverged" in cli("status", run).stdout.splitlines()[0]
    res = cli("doctor", "--json", run)
    assert res.returncode == 1
    finding = json.loads(res.stdout)[0]["findings"][0]
    assert finding["code"] == "nan"
    first_bad = next(r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if r.get("kind") == "train" and not math.isfinite(float(r["loss"])))
    assert f"at step {first_bad:,}" in finding["message"]
    assert cli("plot", run, "-o", tmp_path / "n.png").returncode == 0


def test_doctor_on_a_guard_stopped_run_uses_the_guards_step_and_the_trainers_lr(real_runs):
    run = real_runs["guard_stop"]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    guard = [e for e in events if e.get("event") == "guard"]
    assert guard and guard[-1]["action"] == "stop"
    said = re.search(r"train\.lr=(\S+)", real_runs["stderr"]["guard_stop"]).group(1)  # the trainer's suggestion
    res = cli("doctor", "--json", run)
    assert res.returncode == 1
    f = json.loads(res.stdout)[0]["findings"][0]
    assert f["code"] == "nan" and f"at step {guard[0]['step']:,}" in f["message"]
    assert f"train.lr={said}`" in f["advice"]
    ckpts = runread.list_checkpoints(run)
    assert ckpts and f"({ckpts[-1].name})" in f["advice"]  # the good state the guard saved, not 'the start'
    out = cli("status", run).stdout
    assert "guard stop at step" in out and "(diverged)" in out


def test_a_stopped_status_with_its_reason_is_shown_by_every_reader(real_runs, tmp_path):
    """run.json as the trainer writes it after a guard stop: status stopped, the reason, the resume command."""
    run = copy_run(real_runs["guard_stop"], tmp_path / "stopped")
    m = json.loads((run / "run.json").read_text())
    m.update(status="stopped", stop_reason="loss is nan at step 2",
             resume_command=f"lmlab resume {run} train.lr=500000")
    (run / "run.json").write_text(json.dumps(m))
    (s,) = _status_json(run)
    assert s["status"] == "stopped" and s["stop_reason"] == "loss is nan at step 2"
    assert s["resume_command"] == f"lmlab resume {run} train.lr=500000"
    text = cli("status", run).stdout
    assert "stopped (diverged)" in text and "loss is nan at step 2" in text and "train.lr=500000" in text
    res = cli("doctor", run)
    assert "stopped (diverged)" in res.stdout and f"`lmlab resume {run} train.lr=500000`" in res.stdout
    res = cli("report", run, "-o", tmp_path / "r" / "report.html")
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
def test_null_validation_values_show_as_nothing_never_zero(real_runs, tmp_path):
    run = copy_run(real_runs["healthy"], tmp_path / "noval")
    _rewrite(run, lambda r: {**r, "val_loss": None, "val_ppl": None} if r.get("kind") == "eval" else r)
    m = json.loads((run / "run.json").read_text())
    m["summary"] = {**m.get("summary", {}), "val_loss": None, "val_ppl": None}
    (run / "run.json").write_text(json.dumps(m))
    (s,) = _status_json(run)
    assert s["val_loss"] is None and s["val_ppl"] is None
    text = cli("status", run).stdout
    assert re.search(r"val -\s*$", text, re.M) and "val 0" not in text
    res = cli("doctor", run)
    assert res.returncode == 0 and "val loss" not in res.stdout.splitlines()[0]
    assert cli("plot", run, "-o", tmp_path / "p.png").returncode == 0
    assert cli("report", run, "-o", tmp_path / "r" / "report.html").returncode == 0
    row = next(line for line in (tmp_path / "r" / "report.md").read_text().splitlines()
               if line.startswith("| noval |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8] == "—" and cells[9] == "—"  # final val loss, val ppl
    # records without the keys at all read the same
    _rewrite(run, lambda r: {k: v for k, v in r.items() if k not in ("val_loss", "val_ppl")})
    assert _status_json(run)[0]["val_loss"] is None


# ------------------------------------------------------------------------------ an objective's own metrics
def test_objective_metrics_appear_in_status_watch_and_report(real_runs, tmp_path):
    run = copy_run(real_runs["healthy"], tmp_path / "grpo")

    def add(r):
        if r.get("kind") == "train":
            r.update({"reward": 0.25 + r["step"] / 100, "reward_std": 0.1, "kl": 0.0125, "completion_length": 31.0,
                      "clip_ratio": 0.0, "rewards/format": 0.5})
        return r

    _rewrite(run, add)
    (s,) = _status_json(run)
    assert s["objective"]["reward"] == pytest.approx(0.35) and s["objective"]["rewards/format"] == 0.5
    text = cli("status", run).stdout
    assert "objective   reward 0.35  reward_std 0.1  kl 0.0125" in text
    assert cli("report", run, real_runs["healthy"], "-o", tmp_path / "r" / "report.html").returncode == 0
    md = (tmp_path / "r" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| run | objective |"))
    assert head.split("|")[3:9] == [" reward ", " reward_std ", " kl ", " completion_length ", " clip_ratio ",
                                    " rewards/format "]
    grpo_row = next(line for line in md.splitlines() if line.startswith("| grpo | pretrain | 0.35 |"))
    assert grpo_row and re.search(r"^\| healthy \| pretrain \| — \| — \|", md, re.M)

    from lmlab.monitor.watch import WatchApp

    async def drive():
        app = WatchApp([run, real_runs["healthy"]], interval=60, gpus=False)
        async with app.run_test(size=(220, 48)) as pilot:
            await pilot.pause()
            table = app.query_one("#runs")
            assert str(table.get_cell(str(run), "objective")).startswith("reward 0.35  reward_std 0.1")
            assert str(table.get_cell(str(real_runs["healthy"]), "objective")) == ""

    asyncio.run(drive())


# ------------------------------------------------------------------------------------ a study with no run yet
def test_status_and_watch_on_a_study_folder_with_no_run_yet(real_runs, tmp_path, monkeypatch):
    study = tmp_path / "study"
    (study / ".cells").mkdir(parents=True)
    (study / "study.yaml").write_text("name: s\n")
    res = cli("status", study)
    assert res.returncode == 0 and "no runs yet" in res.stdout, res.stdout + res.stderr
    assert cli("status", tmp_path / "missing").returncode == 2  # a folder that is not there is still an error

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
            copy_run(real_runs["healthy"], study / "cell-a")
            for _ in range(50):
                await pilot.pause(0.1)
                if app.query_one("#runs").row_count:
                    break
            assert app.query_one("#runs").row_count == 1
            assert "cell-a" in str(app.query_one("#title").content)

    asyncio.run(drive())


# ------------------------------------------------------------------------------------ doctor on real healthy runs
def test_doctor_spike_and_stall_rules_on_a_real_run_with_injected_faults(real_runs, tmp_path):
    """The real run's records, lengthened to 200 by replaying its noise: nothing; the same with spikes
    injected: spikes (and nothing else); the same stuck at a flat loss: stalled, listed first."""
    src = [json.loads(x) for x in (real_runs["healthy"] / "metrics.jsonl").read_text().splitlines()]
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
def test_training_an_evaluation_only_size_is_refused_in_one_line_before_any_work(tmp_path):
    res = cli("pretrain", "--model", "inl-tiny-v0", f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=2",
              env={**ENV, "LMLAB_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert len(errors) == 1 and "inl-tiny-v0 cannot be trained" in errors[0], res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no run folder, no data
    assert cli("models", "--family", "inl").returncode == 0  # listing (and evaluating) it still works
