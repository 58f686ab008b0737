"""Readers of run folders: incremental reading, status, doctor, plot, the watch dashboard, system stats.

Runs the trainer wrote (tests/fixture_runs.py) where the trainer can write the state a test needs; hand-written
folders (tests/_runfolders.py) for what it cannot: a run alive and still training (status, eta, the dashboard),
GPU records, and the doctor's pathologies over long histories (spikes, a rising or stalled loss, overfitting,
a throughput drop, a stale or missing checkpoint, a full disk)."""

import argparse
import asyncio
import json
import math
import threading
import time

import pytest
from _runfolders import GB, SCENARIOS, fake_disk, make_run, write_run
from fixture_runs import copy_run

from lmlab import runs
from lmlab.errors import LmlabError
from lmlab.monitor import doctor, gpu, runread, status


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


# incremental reading -----------------------------------------------------------------------------------
def test_tail_reads_only_appended_lines_and_waits_for_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1, "loss": 3.0}) + "\n")
    tail = runread.MetricsTail(path)
    assert [r["step"] for r in tail.poll()] == [1]
    assert tail.poll() == []
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "train", "step": 2, "loss": 2.9}) + "\n")
        f.write('{"kind": "train", "step": 3, "lo')  # the writer is mid-line
    assert [r["step"] for r in tail.poll()] == [2]
    assert tail.lines_read == 2  # line 1 was not parsed again
    with open(path, "a") as f:
        f.write('ss": 2.8}\n{not json}\n')
    assert [r["step"] for r in tail.poll()] == [3]
    assert tail.bad_lines == 1 and tail.lines_read == 4
    path.write_text(json.dumps({"kind": "train", "step": 9}) + "\n")  # replaced (shorter): read from the start
    assert [r["step"] for r in tail.poll()] == [9]


def test_reader_refresh_is_incremental_and_summarises(tmp_path):
    run = write_run(tmp_path, "r", n_logs=50, gpus=None)
    reader = runread.RunReader(run)
    s = reader.refresh()
    n = reader.tail.lines_read
    assert s.status == "running" and s.alive is True
    assert s.step == 500 and s.total_steps == 2000 and s.progress == 0.25
    assert s.last_checkpoint == "step-00000400" and s.checkpoint_age_s < 120
    assert s.val_loss is not None and s.val_ppl == pytest.approx(math.exp(s.val_loss))
    assert s.eta_s == pytest.approx(1500 / 5, rel=0.05)  # 10 steps every 2 s
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 510, "time": time.time(), "loss": 1.0, "lr": 1e-4,
                            "grad_norm": 0.5, "tok_s": 1000.0}) + "\n")
    s = reader.refresh()
    assert reader.tail.lines_read == n + 1
    assert s.step == 510 and s.loss == 1.0 and s.loss_smooth < reader.loss_smooth[-2]
    assert s.to_dict()["progress"] == pytest.approx(510 / 2000)


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == kind]


def test_the_reader_summarises_what_the_trainer_wrote_and_reads_only_what_is_appended(pretrain_run, tmp_path):
    run = copy_run(pretrain_run, tmp_path / "r")
    reader = runread.RunReader(run)
    s = reader.refresh()
    train, evals = _records(run, "train"), _records(run, "eval")
    manifest = json.loads((run / "run.json").read_text())
    assert s.status == "finished" == manifest["status"] and s.alive is None and not s.diverged
    assert s.step == 10 == s.total_steps and s.progress == 1.0 and s.eta_s == 0.0 and s.has_final
    assert (s.loss, s.lr, s.tokens) == (train[-1]["loss"], train[-1]["lr"], train[-1]["tokens"])
    assert s.val_loss == evals[-1]["val_loss"] and s.val_ppl == pytest.approx(math.exp(s.val_loss), rel=1e-4)
    assert (s.n_checkpoints, s.last_checkpoint, s.last_checkpoint_step) == (2, "step-00000010", 10)
    assert s.loss_smooth == pytest.approx(runread.ema([r["loss"] for r in train])[-1])
    assert s.restarts == 0 and s.skipped == 0 and s.problems == [] and s.elapsed_s is not None
    n = reader.tail.lines_read
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**train[-1], "step": 11, "loss": 1.0}) + "\n" + '{"kind": "tra')  # and a torn line
    s = reader.refresh()
    assert reader.tail.lines_read == n + 1 and s.step == 11 and s.loss == 1.0 and s.problems == []


def test_nan_values_and_find_runs(pretrain_run, diverged_runs, tmp_path):
    root = pretrain_run.parent
    found = runread.resolve_runs([root])
    assert [p.name for p in found if p.name in ("guard_stop", "nan", "pretrain")] == ["guard_stop", "nan", "pretrain"]
    assert all(runs.is_run(p) for p in found) and runread.resolve_runs([root / "nan"]) == [root / "nan"]
    s = runread.RunReader(diverged_runs["nan"]).refresh()
    assert s.status == json.loads((root / "nan" / "run.json").read_text())["status"] != "running"
    assert s.alive is None and s.diverged and math.isnan(s.loss) and s.to_dict()["loss"] == "nan"
    (tmp_path / "notes").mkdir()
    with pytest.raises(LmlabError, match="no run folders"):
        runread.resolve_runs([tmp_path / "notes"])
    with pytest.raises(LmlabError, match="no such folder"):
        runread.resolve_runs([tmp_path / "missing"])


def test_pid_alive_is_false_for_a_gone_a_reused_and_an_exited_unreaped_pid():
    import os
    import subprocess
    import sys

    from _runfolders import dead_pid

    from lmlab.fsutil import pid_alive

    assert pid_alive(os.getpid()) and runread.pid_alive is pid_alive  # one pid_alive, the readers' too
    assert not pid_alive(dead_pid()) and not pid_alive(None) and not pid_alive(0)
    assert not pid_alive(os.getpid(), started=time.time() - 3600 * 24 * 365)  # the pid was reused
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # exited, not yet reaped: kill(pid, 0) still succeeds
            if open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.02)
        assert not pid_alive(zombie.pid)
    finally:
        zombie.wait()


# doctor ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_doctor_finds_each_problem_and_nothing_on_healthy_runs(tmp_path, scenario):
    path = make_run(tmp_path, scenario)
    reader = runread.RunReader(path, disk_usage=fake_disk(500 * GB))
    findings = doctor.diagnose(reader)
    codes = {f.code for f in findings}
    expected = SCENARIOS[scenario][1]
    if expected is None:
        assert findings == []
        assert "no problems found" in doctor.text_report(reader, findings)
    else:
        assert expected in codes
        f = next(f for f in findings if f.code == expected)
        assert any(ch.isdigit() for ch in f.message) and f.advice  # numbers, and what to do
        assert codes <= {expected, "overfitting"}  # no unrelated alarms


def test_doctor_numbers_and_disk(tmp_path):
    path = make_run(tmp_path, "healthy")
    reader = runread.RunReader(path, disk_usage=fake_disk(3000, 1000 * GB))
    (f,) = doctor.diagnose(reader)
    assert f.code == "disk" and "nearly full" in f.message and f.severity == "error"  # less than one checkpoint
    nan = doctor.diagnose(make_run(tmp_path, "nan"))
    msg = next(f for f in nan if f.code == "nan")
    assert "step 610" in msg.message and "step-00000600" in msg.advice and "train.lr=" in msg.advice
    dead = doctor.diagnose(make_run(tmp_path, "dead"))[0]
    assert dead.code == "dead" and dead.severity == "error" and "lmlab resume" in dead.advice


def test_doctor_command_exit_codes(tmp_path, capsys):
    from lmlab.commands import doctor as cmd

    healthy = make_run(tmp_path, "healthy", gpus=None)
    assert cmd.run(_args(cmd, [str(healthy)])) == 0
    assert "no problems found" in capsys.readouterr().out
    bad = make_run(tmp_path, "stalled")
    assert cmd.run(_args(cmd, [str(bad), "--json"])) == 1
    out = json.loads(capsys.readouterr().out)
    assert out[0]["findings"][0]["code"] == "stalled"


# status ---------------------------------------------------------------------------------------------------
def test_status_text_and_json(tmp_path, capsys):
    from lmlab.commands import status as cmd

    make_run(tmp_path, "healthy")
    make_run(tmp_path, "dead")
    assert cmd.run(_args(cmd, [str(tmp_path)])) == 0
    text = capsys.readouterr().out
    assert "healthy  running" in text and "dead  running (dead)" in text and "1,000/2,000" in text
    assert cmd.run(_args(cmd, [str(tmp_path), "--json"])) == 0
    data = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert data["healthy"]["alive"] is True and data["dead"]["alive"] is False
    assert data["healthy"]["step"] == 1000 and data["healthy"]["last_checkpoint"] == "step-00001000"
    with pytest.raises(LmlabError):
        cmd.run(_args(cmd, [str(tmp_path / "missing")]))
    assert "history" not in text and data["healthy"]["restarts"] == 0 and data["healthy"]["skipped"] == 0


def test_status_counts_restarts_and_guard_skips(tmp_path, capsys):
    from lmlab.commands import status as cmd

    run = make_run(tmp_path, "healthy", name="r")
    manifest = json.loads((run / "run.json").read_text())
    first = manifest["sessions"][0]
    manifest["sessions"] += [{**first, "resumed_from_step": 200}, {**first, "resumed_from_step": 800}]
    (run / "run.json").write_text(json.dumps(manifest))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 1010, "time": time.time(), "loss": 2.5, "skipped": 3}) + "\n")
    assert cmd.run(_args(cmd, [str(run)])) == 0
    assert "history     2 restarts (from step 200, 800)   3 steps skipped by the guard" in capsys.readouterr().out
    assert cmd.run(_args(cmd, [str(run), "--json"])) == 0
    (data,) = json.loads(capsys.readouterr().out)
    assert (data["restarts"], data["resumed_from"], data["skipped"]) == (2, [200, 800], 3)


def test_formatters():
    assert status.spark([1, 2, 3, 4]) == "▁▃▅█"
    assert len(status.spark(range(100), 10)) == 10
    assert status.bar(0.5, 4) == "██░░"
    assert status.fmt_duration(3725) == "1h02m" and status.fmt_bytes(1536) == "1.5 KB"


# plot -----------------------------------------------------------------------------------------------------
def test_plot_lines_carry_the_runs_data(pretrain_run, tmp_path):
    from lmlab.commands import plot as cmd
    from lmlab.monitor.plots import plot_runs

    a = copy_run(pretrain_run, tmp_path / "a")  # what the trainer wrote
    b = make_run(tmp_path, "throughput", name="b")  # a long history whose throughput drops
    fig = plot_runs([a, b], tmp_path / "p.png")
    loss_ax, val_ax, lr_ax, tok_ax = fig.axes[:4]
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert set(lines) == {"a", "a (smoothed)", "b", "b (smoothed)"}
    ra = runread.RunReader(a)
    ra.refresh()
    xs, ys = ra.series("train", "loss")
    assert list(lines["a"].get_xdata()) == xs and list(lines["a"].get_ydata()) == ys
    assert list(lines["a (smoothed)"].get_ydata()) == pytest.approx(runread.ema(ys))
    assert {ln.get_label() for ln in val_ax.get_lines()} == {"a", "b"}
    assert max(lr_ax.get_lines()[0].get_ydata()) == pytest.approx(max(ra.series("train", "lr")[1]))
    tok_b = {ln.get_label(): ln for ln in tok_ax.get_lines()}["b"].get_ydata()
    assert tok_b[-1] < 0.5 * tok_b[10]  # the drop is on the plot
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert cmd.run(_args(cmd, [str(a), "-o", str(tmp_path / "q.png"), "--x", "tokens"])) == 0
    assert (tmp_path / "q.png").is_file()


# system stats ---------------------------------------------------------------------------------------------
def test_gpu_stats_absent_and_fake():
    assert gpu.gpu_stats(gpu.FakeGpuSource([])) == []
    fake = gpu.FakeGpuSource([{"util": 50, "uuid": "GPU-abc"}, {"util": 70}])
    stats = gpu.gpu_stats(fake)
    assert [g["util"] for g in stats] == [50, 70] and stats[0]["uuid"] == "GPU-abc"
    assert isinstance(gpu.gpu_stats(), list)  # NVML or not, never raises
    assert gpu.throttle_names(0x4 | 0x40) == ["power cap", "hw thermal"]
    assert gpu.norm_uuid("GPU-ABC") == gpu.norm_uuid("abc")


def test_system_sampler_never_blocks_and_survives_errors():
    got, calls = [], []
    release = threading.Event()

    def slow(stats):
        calls.append(stats)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        got.append(stats)
        release.wait(5)

    fake = gpu.FakeGpuSource([{"uuid": "GPU-aaa", "util": 90}, {"uuid": "GPU-bbb", "util": 10}])
    sampler = gpu.SystemSampler(slow, interval_s=0.01, gpu_source=fake, gpu_uuids=["aaa"])
    t0 = time.perf_counter()
    sampler.start()
    assert time.perf_counter() - t0 < 0.5  # start returns at once even though the callback blocks
    for _ in range(200):
        if got:
            break
        time.sleep(0.01)
    release.set()
    sampler.stop()
    assert sampler.errors == 1 and isinstance(sampler.last_error, RuntimeError)
    s = got[0]
    assert [g["uuid"] for g in s["gpus"]] == ["GPU-aaa"]
    assert {"time", "cpu_percent", "ram_used", "ram_total", "rss", "load1"} <= set(s)
    assert s["ram_total"] is None or s["ram_total"] > s["ram_used"] > 0


# watch ----------------------------------------------------------------------------------------------------
def _cell(table, row, col):
    return str(table.get_cell(row, col))


def test_watch_dashboard_headless(tmp_path):
    from textual.widgets import DataTable, Label, Log, Sparkline, Static

    from lmlab.monitor.watch import WatchApp

    study = tmp_path / "study"
    a = make_run(study, "healthy", name="a-healthy")
    make_run(study, "dead", name="b-dead", n_logs=60)
    fake = gpu.FakeGpuSource([{"name": "RTX 4090", "util": 97, "mem_used": 20 * GB, "temp": 71,
                               "throttle": ["power cap"]}])
    shot = tmp_path / "shots"
    shot.mkdir()

    async def drive():
        app = WatchApp([study], interval=60, gpu_source=fake)
        async with app.run_test(size=(180, 48)) as pilot:
            await pilot.pause()
            table = app.query_one("#runs", DataTable)
            assert table.row_count == 2
            key_a, key_b = str(study / "a-healthy"), str(study / "b-dead")
            assert _cell(table, key_a, "status") == "running"
            assert _cell(table, key_b, "status") == "running (dead)"
            assert _cell(table, key_b, "step").startswith("600/2,000")
            assert _cell(table, key_a, "step").startswith("1,000/2,000 ████░░░░")
            assert _cell(table, key_a, "checkpoint").startswith("1,000 (")
            assert _cell(table, key_a, "loss")[-1] in status.SPARK
            gpus = str(app.query_one("#gpus", Static).content)
            assert "RTX 4090" in gpus and "97%" in gpus and "power cap" in gpus
            assert len(app.query_one("#spark-loss", Sparkline).data) == 100
            assert "val loss" in str(app.query_one("#label-val", Label).content)
            log = app.query_one("#log", Log)
            assert "eval step 1000" in log.lines[-1] and "step 1000/2000 loss" in log.lines[-2]
            app.save_screenshot("watch.svg", str(shot))

            # the run advances: the row and the log follow, reading only what was appended
            with open(a / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"kind": "train", "step": 1010, "time": time.time(), "loss": 2.5, "lr": 1e-4,
                                    "grad_norm": 0.4, "tok_s": 51000.0}) + "\n")
            with open(a / "train.log", "a") as f:
                f.write("2025-01-01 00:00:01 step 1010/2000 loss 2.5000\n")
            await pilot.press("r")
            await pilot.pause()
            assert _cell(table, key_a, "step").startswith("1,010/2,000")
            assert log.lines[-1].endswith("step 1010/2000 loss 2.5000")

            await pilot.press("down")  # select the dead run
            await pilot.pause()
            assert app.selected == key_b
            assert "b-dead" in str(app.query_one("#title", Static).content)
            assert "step 600/2000 loss" in log.lines[-2]  # the log panel follows the selected run
            assert "step 600/2000 loss" in app.export_screenshot().replace("&#160;", " ")

        no_gpu = WatchApp([study / "b-dead"], interval=60, gpu_source=gpu.FakeGpuSource([]))
        async with no_gpu.run_test(size=(160, 40)) as pilot:
            await pilot.pause()
            assert "no GPU" in str(no_gpu.query_one("#gpus", Static).content)

    asyncio.run(drive())
    svg = (shot / "watch.svg").read_text()
    assert svg.startswith("<svg") and "a-healthy" in svg


# smoothing ---------------------------------------------------------------------------------------------------
def test_smoothed_loss_of_a_short_run_follows_it():
    """A short run is smoothed over a span of ~10 % of its records: a falling loss is not trailed far behind."""
    losses = [10.0 * 0.78 ** i for i in range(10)]  # 10 → 1.07 in ten records
    smooth = runread.ema(losses, 0.9)
    assert smooth[-1] == pytest.approx(losses[-1])  # ten records: no smoothing at all
    long = [5.0 + (i % 2) * 0.2 for i in range(400)]
    assert runread.ema(long, 0.9)[-1] == pytest.approx(runread.ema(long, 0.9, scale=False)[-1])
    assert runread.smoothing_weight(30, 0.9) == pytest.approx(1 - 1 / 3)
    assert runread.smoothing_weight(10_000, 0.9) == 0.9


def test_the_readers_smoothing_matches_ema_as_records_arrive(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rng = [8.0 - 0.05 * i for i in range(150)]
    reader = runread.RunReader(run)
    with open(run / "metrics.jsonl", "w") as f:
        for i, v in enumerate(rng):
            f.write(json.dumps({"kind": "train", "step": i + 1, "time": i, "loss": v}) + "\n")
            f.flush()
            if i in (4, 30, 99, 120, 149):
                reader.refresh()
                assert reader.loss_smooth == pytest.approx(runread.ema(rng[:i + 1], 0.9))
    assert reader.state.loss_smooth == pytest.approx(runread.ema(rng, 0.9)[-1])
    assert abs(reader.state.loss_smooth - rng[-1]) < 0.5


def test_doctor_calls_a_run_stuck_near_a_uniform_guess_stalled_before_its_spikes(tmp_path):
    """8.32 → 8.28 over a whole run with a vocabulary of 4,096 (ln 4,096 = 8.32) and a few grad-norm spikes:
    stalled comes first; the same run that learned before it flattened is a plateau note, not a warning."""
    run = write_run(tmp_path, "stuck", status="finished", loss=lambda i, s: 8.36 - 0.04 * s / 1000,
                    grad_norm=lambda i, s: 6.0 if i in (55, 80) else 0.6, lr=lambda i, s: 3e-3)
    (run / "config.yaml").write_text("train:\n  log_every: 10\n  save_every: 200\n  warmup_steps: 100\n"
                                     "data:\n  vocab_size: 4096\n")
    findings = doctor.diagnose(run)
    assert [f.code for f in findings] == ["stalled", "spikes"]
    assert "uniform guess over 4,096 tokens" in findings[0].message
    learned = write_run(tmp_path, "learned", status="finished", loss=lambda i, s: 3.0 + 5.0 * math.exp(-s / 60))
    assert [(f.code, f.severity) for f in doctor.diagnose(learned)] == [("plateau", "note")]


def test_doctor_suggests_bf16_for_a_cpu_run_where_the_cpus_bf16_is_faster(pretrain_run, monkeypatch):
    """A note (not a warning) on a run the trainer wrote in fp32 on this host's CPU: only where the CPU has bf16
    instructions and its bf16 matmuls measure faster than fp32's, where bf16 is the faster precision."""
    from lmlab import runtime

    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "AMX")
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 4.0)
    found = [f for f in doctor.diagnose(pretrain_run) if f.code == "cpu_bf16"]
    assert len(found) == 1 and found[0].severity == "note"
    assert "(AMX; bf16 matmuls measured 4.0x fp32's)" in found[0].message
    assert "train.precision=bf16" in found[0].advice
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 0.6)
    assert not [f for f in doctor.diagnose(pretrain_run) if f.code == "cpu_bf16"]
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: None)
    monkeypatch.setattr(runtime, "cpu_bf16_matmul_speedup", lambda: 4.0)
    assert not [f for f in doctor.diagnose(pretrain_run) if f.code == "cpu_bf16"]
