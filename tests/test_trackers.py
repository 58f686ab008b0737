"""Weights & Biases and trackio sinks (lmlab.monitor.trackers): config keys, the missing-package line, a failing
tracker that must not stop training, and one tiny offline run (+ resume) read back from each service's own local
files. Nothing leaves the machine: W&B runs offline, trackio writes its local SQLite file, HOME is a tmp folder."""

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.monitor import trackers
from lmlab.monitor.trackers import scalars


def _args(tok, out, name, steps):
    return ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
            "data.source=stdlib", "data.max_docs=40", f"data.tokenizer={tok}", "data.seq_len=32",
            "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=4", "train.eval_every=2",
            "train.eval_batches=2", "train.log_every=1", "train.threads=1", "train.sample_tokens=2",
            "train.progress=false", "train.warmup_steps=2", "train.lr=3e-3", "train.system_every=0",
            f"run.out_dir={out}", f"run.name={name}"]


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ------------------------------------------------------------------------------------------- config, mapping
def test_numbers_become_kind_slash_field():
    got = scalars("system", {"cpu_percent": 35.0, "host": "a", "ok": True, "bad": float("nan"),
                             "gpus": [{"index": 1, "util": 97, "name": "H100"}]})
    assert got == {"system/cpu_percent": 35.0, "system/gpus.1.util": 97}
    assert scalars("event", {"event": "finished", "val_loss": 2.5, "path": "x"}) == {"event/finished.val_loss": 2.5}
    assert scalars("event", {"event": "stopped"}) == {}


@pytest.mark.parametrize("override, message", [
    ("log.wandb_mode=cloud", "log.wandb_mode: invalid value 'cloud'; allowed: offline, online, disabled"),
    ("log.wandb_project=a/b", "log.wandb_project: must be 1-128 characters"),
    ("log.trackio=maybe", "log.trackio: expected true or false, got 'maybe'"),
    ("log.wandbb=true", "log.wandbb: unknown key; allowed: wandb, wandb_project, wandb_mode, trackio"),
])
def test_bad_log_values_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_are_off_and_offline():
    cfg = load_config(None, [])
    assert (cfg.log.wandb, cfg.log.trackio, cfg.log.wandb_mode) == (False, False, "offline")
    assert cfg.to_dict()["log"]["wandb_project"] == "lmlab"


@pytest.mark.parametrize("service", ["wandb", "trackio"])
def test_a_missing_package_is_one_line_naming_the_extra(service, stdlib_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, service, None)  # `import wandb` now fails, as if not installed
    from lmlab.cli import main

    out = tmp_path / "runs"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"log.{service}=true"])
    assert str(e.value) == (f"log.{service}: the {service} package is not installed; "
                            f"install it with: pip install 'lmlab[{service}]'")
    assert main(["pretrain", *_args(stdlib_tokenizer_dir, out, "x", 2), f"log.{service}=true"]) == 2
    assert not out.exists()  # refused before any run folder
    load_config(None, ["log.wandb=true", "log.wandb_mode=disabled"] if service == "wandb" else [])


def test_neither_package_is_imported_until_a_run_asks():
    code = ("import sys, json\nfrom lmlab.cli import main\nfrom lmlab.monitor import trackers\n"
            "assert not trackers.missing_package('wandb')\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'trackio'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------------------------- a failing tracker
class _Flaky:
    """Stands in for a service: logs fine until step 3, then raises like a dropped connection."""

    name = "wandb"
    seen: list = []
    finished: list = []

    def __init__(self, cfg, run_dir, saved):
        self.state = {"id": "flaky"}

    def describe(self):
        return "fake"

    def log(self, step, values):
        if step >= 3:
            raise ConnectionError("network is unreachable\nsecond line")
        _Flaky.seen.append((step, dict(values)))

    def finish(self, status):
        _Flaky.finished.append(status)


class _Good(_Flaky):
    name = "trackio"

    def log(self, step, values):
        _Good.seen.append((step, dict(values)))

    def finish(self, status):
        _Good.finished.append(status)


def test_a_failing_tracker_never_stops_training(stdlib_tokenizer_dir, tmp_path, monkeypatch):
    from lmlab.train.loop import train

    monkeypatch.setattr(trackers, "missing_package", lambda name: False)
    monkeypatch.setitem(trackers.SERVICES, "wandb", _Flaky)
    monkeypatch.setitem(trackers.SERVICES, "trackio", _Good)
    _Flaky.seen, _Flaky.finished, _Good.seen, _Good.finished = [], [], [], []
    lines = []
    cfg = load_config(None, [*_args(stdlib_tokenizer_dir, tmp_path, "flaky", 6), "log.wandb=true", "log.trackio=true"])
    run = train(cfg, echo=lines.append)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4, 5, 6]
    log = (run / "train.log").read_text()
    assert log.count("wandb: stopped logging at step 3 (ConnectionError: network is unreachable); "
                     "training continues without it") == 1
    assert max(s for s, _ in _Flaky.seen) == 2 and _Flaky.finished == []  # dropped: not finished either
    train_loss = {r["step"]: r["loss"] for r in _records(run, "train")}
    assert {s: v["train/loss"] for s, v in _Good.seen if "train/loss" in v} == train_loss
    assert _Good.finished == ["finished"]
    assert json.loads((run / "trackers.json").read_text()) == {"wandb": {"id": "flaky"}, "trackio": {"id": "flaky"}}
    assert any(line.startswith("wandb     fake") for line in lines)


def test_a_slow_tracker_never_holds_up_the_sink(tmp_path, monkeypatch):
    import threading

    from lmlab.monitor.events import EventSink

    gate, got, done = threading.Event(), [], []

    class Slow:
        name = "slow"

        def log(self, step, values):
            gate.wait(30)  # a service stuck on the network
            got.append(step)

        def finish(self, status):
            done.append(status)

    monkeypatch.setattr(trackers, "QUEUE_SIZE", 2)
    sink = EventSink(tmp_path, echo=lambda line: None)
    sink.attach(trackers.Trackers([Slow()], warn=sink.text))
    for step in range(1, 21):  # returns at once although the service takes nothing yet
        sink.log("train", step, loss=1.0 / step)
    gate.set()
    sink.close("stopped")
    assert got[0] == 1 and len(got) < 20 and done == ["stopped"]
    assert (tmp_path / "train.log").read_text().count("some were dropped") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 20  # the run's own records are whole


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_goes_on(stdlib_tokenizer_dir, tmp_path, monkeypatch):
    from lmlab.train.loop import train

    class NoLogin(_Flaky):
        def __init__(self, cfg, run_dir, saved):
            raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(trackers, "missing_package", lambda name: False)
    monkeypatch.setitem(trackers.SERVICES, "wandb", NoLogin)
    lines = []
    run = train(load_config(None, [*_args(stdlib_tokenizer_dir, tmp_path, "nologin", 2), "log.wandb=true",
                                   "log.wandb_mode=online"]), echo=lines.append)
    msg = "wandb: not started (RuntimeError: api_key not configured (no-tty)); training continues without it"
    assert msg in lines and msg in (run / "train.log").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not (run / "trackers.json").exists()


# ------------------------------------------------------------------------------------------- the real services
def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (':W&B', magic,
    version), then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, type 1 a whole
    record, 2/3/4 its first/middle/last piece; block tails shorter than a chunk header are zero padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _wandb_run(path: Path) -> dict:
    """history {step: {key: value}}, config, summary and exit code of one offline run file."""
    out = {"history": {}, "config": {}, "summary": {}, "exit": None, "run": None}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"][rec.history.step.num] = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                                    for i in rec.history.item}
        elif kind == "run":
            out["run"] = rec.run
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "summary":
            out["summary"].update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json)
                                   for u in rec.summary.update})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def _offline_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "TRACKIO_")) and k not in ("HF_TOKEN", "SPACE_ID", "SYSTEM")}
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
            "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_ERROR_REPORTING": "false", "WANDB_DIR": str(tmp_path / "wb"),
            "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
            "WANDB_DATA_DIR": str(home / "wandb-data"), "TRACKIO_DIR": str(tmp_path / "trackio"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_wandb_offline_and_trackio_local_log_what_metrics_jsonl_has(stdlib_tokenizer_dir, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    env = _offline_env(tmp_path)
    out, run = tmp_path / "runs", tmp_path / "runs" / "tracked"
    cli = [sys.executable, "-m", "lmlab.cli"]
    first = subprocess.run([*cli, "pretrain", *_args(stdlib_tokenizer_dir, out, "tracked", 4), "log.wandb=true",
                            "log.wandb_mode=offline", "log.trackio=true", "log.trackio_project=lmlab-test"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((run / "trackers.json").read_text())
    wid = state["wandb"]["id"]
    assert f"wandb     offline run {wid}, nothing sent; upload later: wandb sync" in first.stdout
    # a resumed run continues the same W&B run id and the same trackio run
    second = subprocess.run([*cli, "resume", str(run), "train.max_steps=6"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run / "trackers.json").read_text()) == state

    train = {r["step"]: r for r in _records(run, "train")}
    evals = {r["step"]: r for r in _records(run, "eval")}
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [2, 4, 6]

    # W&B: two offline run folders (first run, resume), one id, every train/eval number at its step
    files = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{wid}/run-{wid}.wandb"))
    assert len(files) == 2, list((tmp_path / "wb").rglob("*"))
    runs = [_wandb_run(f) for f in files]
    history: dict[int, dict] = {}
    for r in runs:
        for step, row in r["history"].items():
            history.setdefault(step, {}).update(row)
    # step 0: the start event; step 4 again in the second: the resume event
    assert sorted(runs[0]["history"]) == [0, 1, 2, 3, 4] and sorted(runs[1]["history"]) == [4, 5, 6]
    assert history[0]["event/start.total_steps"] == 4 and history[4]["event/resume.tokens"] == 512
    for step, rec in train.items():
        assert history[step]["train/loss"] == rec["loss"]
        assert history[step]["train/lr"] == rec["lr"]
    for step, rec in evals.items():
        assert history[step]["eval/val_loss"] == rec["val_loss"]
    assert runs[0]["run"].display_name == "tracked" and runs[0]["run"].project == "lmlab"
    assert runs[0]["config"]["train"]["max_steps"] == 4 and runs[0]["config"]["log"]["wandb"] is True
    assert [r["summary"]["status"] for r in runs] == ["finished", "finished"] and [r["exit"] for r in runs] == [0, 0]

    # trackio: its local SQLite file, one run (same id before and after the resume)
    db = sqlite3.connect(tmp_path / "trackio" / "lmlab-test.db")
    rows = db.execute("SELECT run_id, run_name, step, metrics FROM metrics ORDER BY id").fetchall()
    assert {(r[0], r[1]) for r in rows} == {(state["trackio"]["id"], "tracked")}
    logged: dict[int, dict] = {}
    for _, _, step, metrics in rows:
        logged.setdefault(step, {}).update(json.loads(metrics))
    for step, rec in train.items():
        assert logged[step]["train/loss"] == rec["loss"]
    for step, rec in evals.items():
        assert logged[step]["eval/val_loss"] == rec["val_loss"]
    (config,) = db.execute("SELECT config FROM configs").fetchone()
    assert json.loads(config)["model"]["name"] == "mamba-swelu-tiny"
    db.close()
