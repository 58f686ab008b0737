"""lmlab report: numbers in the HTML match the run folders; every image decodes in a real headless browser.

A run the trainer wrote (tests/fixture_runs.py) for what it writes; hand-written folders for what a CPU test run
cannot produce: two ranks, GPU power records, a resume an hour later, seeds and sizes for the scaling fit."""

import base64
import csv
import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

pytest.importorskip("matplotlib")

from lmlab.report import build_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
T0 = 1_700_000_000.0
ALPHA, A = 0.1, 10.0  # final val loss = A · tokens^(−ALPHA)


def _config(seed, steps):
    return {"model": {"name": "mamba-swelu-tiny", "overrides": {"d_model": 32}},
            "data": {"source": "stdlib", "seq_len": 32},
            "train": {"max_steps": steps, "seed": seed, "lr": 3e-3, "threads": 1},
            "run": {"name": None, "out_dir": "runs"}}


def _write_run(root, name, seed, steps, final_loss, *, world_size=None, resume_gap=False, power=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({**_config(seed, steps), "run": {"name": name, "out_dir": "x"}}))
    tps = 1000  # tokens per step
    manifest = {"name": name, "status": "finished", "parameters": 50_000, "model": "mamba-swelu-tiny",
                "summary": {"tokens": steps * tps, "val_loss": final_loss, "unigram_ppl": math.exp(7.0)}}
    if world_size:
        manifest["world_size"] = world_size
    (d / "run.json").write_text(json.dumps(manifest))
    recs = [{"kind": "event", "step": 0, "time": T0, "event": "start", "params": 50_000}]
    t = T0
    for step in range(1, steps + 1):
        t += 2.0  # two seconds per step
        if resume_gap and step == steps // 2 + 1:  # killed, then resumed an hour later: the gap is not run time
            t += 3600
            recs.append({"kind": "event", "step": step - 1, "time": t, "event": "resume"})
            t += 2.0
        recs.append({"kind": "train", "step": step, "time": t, "tokens": step * tps, "loss": 8.0 - step / steps,
                     "lr": 1e-3})
        recs.append({"kind": "swelu", "step": step, "time": t, "block.0.k": 1.0 + step / 100,
                     "block.0.lam": 1.0 - step / 200})
        if power is not None:
            recs.append({"kind": "system", "step": step, "time": t, "gpus": [{"power_w": power}] * (world_size or 1)})
        if step % 5 == 0:
            loss = final_loss if step == steps else final_loss + 0.5
            recs.append({"kind": "eval", "step": step, "time": t, "tokens": step * tps, "val_loss": loss,
                         "val_ppl": math.exp(loss)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')  # torn line
    (d / "samples.jsonl").write_text(json.dumps({"step": steps, "prompt": "def ", "completion": f"f_{name}():"})
                                     + "\n")
    (d / "eval").mkdir()
    (d / "eval" / "a.json").write_text(json.dumps({"created": "2026-01-01T00:00:00", "perplexity": {
        "validation": {"ppl": 100.0 + seed, "loss": math.log(100.0 + seed), "tokens": 4096}},
        "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.25, "n": 8}}}))
    (d / "eval" / "b.json").write_text(json.dumps({"created": "2026-01-02T00:00:00", "perplexity": {
        "notes.txt": {"ppl": 200.0 + seed, "loss": 5.3, "tokens": 512}},
        "tasks": {"piqa": {"acc": 0.5 + seed / 100, "acc_norm": 0.4, "n": 8}}}))
    return d


def _loss(tokens):
    return A * tokens ** (-ALPHA)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs = root / "runs"
    # two seeds of one config at 20 steps (loss spread symmetrically in log space), one run at 100 steps
    spread = 0.01
    _write_run(runs, "swelu-s1", 1, 20, _loss(20_000) * math.exp(spread), world_size=2, resume_gap=True, power=300.0)
    _write_run(runs, "swelu-s2", 2, 20, _loss(20_000) * math.exp(-spread), world_size=2)
    _write_run(runs, "swelu-long", 1, 100, _loss(100_000))
    (runs / "study.yaml").write_text(yaml.safe_dump({"hardware": "h100"}))
    out = root / "out" / "report.html"
    res = build_report([runs], out)
    return runs, res


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._table, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            raise AssertionError("the report must not contain scripts")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path):
    p = _Tables()
    p.feed(path.read_text())
    return p


def _rows(table):
    header, *rows = table
    return {r[0]: dict(zip(header, r)) for r in rows}


def _num(text):
    return float(text.replace(",", ""))


def test_numbers_in_the_html_match_the_run_files(study):
    runs, res = study
    p = _parse(res["html"])
    rt = _rows(p.tables["runs"])
    assert set(rt) == {"swelu-s1", "swelu-s2", "swelu-long"}
    assert _num(rt["swelu-long"]["tokens"]) == 100_000
    assert _num(rt["swelu-long"]["final val loss"]) == pytest.approx(_loss(100_000), rel=1e-5)
    assert _num(rt["swelu-s2"]["final train loss"]) == pytest.approx(7.0, rel=1e-6)
    assert _num(rt["swelu-long"]["tokens/param"]) == pytest.approx(2.0)

    cost = _rows(p.tables["cost"])
    # s1: 20 steps × 2 s, the hour-long gap before the resume excluded; 2 devices; h100 at 2.50 per GPU-hour
    s1_hours = 40 / 3600 * 2
    assert _num(cost["swelu-s1"]["GPU-hours"]) == pytest.approx(s1_hours, rel=1e-5)
    assert _num(cost["swelu-s1"]["cost"]) == pytest.approx(s1_hours * 2.50, rel=1e-5)
    assert "h100" in cost["swelu-s1"]["price / GPU-h"]
    # 2 GPUs × 300 W between power readings: 9 intervals of 2 s before the resume and 9 after (the gap is off)
    assert _num(cost["swelu-s1"]["energy (kWh)"]) == pytest.approx(2 * 300 * 2 * 18 / 3.6e6, rel=1e-5)
    assert cost["swelu-s2"]["energy (kWh)"] == "—"
    assert _num(cost["swelu-long"]["devices"]) == 1
    assert _num(cost["swelu-long"]["tokens / GPU-h"]) == pytest.approx(100_000 / (200 / 3600), rel=1e-5)

    ppl = _rows(p.tables["perplexity"])  # both eval files merged
    assert _num(ppl["swelu-s2"]["validation"]) == pytest.approx(102.0)
    assert _num(ppl["swelu-s2"]["notes.txt"]) == pytest.approx(202.0)
    bench = _rows(p.tables["benchmarks"])  # the newer file wins
    assert _num(bench["swelu-s2"]["piqa acc"]) == pytest.approx(0.52)
    assert _num(bench["swelu-s1"]["piqa acc_norm"]) == pytest.approx(0.4)

    seeds = _rows(p.tables["seeds"])
    grp = seeds["swelu"]  # the names without their seed suffix
    assert grp["seeds"] == "1, 2"
    m, s = (_num(x) for x in grp["final val loss"].split("±"))
    vals = [_loss(20_000) * math.exp(0.01), _loss(20_000) * math.exp(-0.01)]
    assert m == pytest.approx(np.mean(vals), rel=1e-5) and s == pytest.approx(np.std(vals, ddof=1), rel=1e-4)
    assert seeds["swelu-long"]["seeds"] == "1"

    fit = p.tables["fit"][1]
    assert _num(fit[2]) == pytest.approx(ALPHA, rel=1e-4) and _num(fit[1]) == pytest.approx(A, rel=1e-3)
    budget = next(t for k, t in p.tables.items() if k.startswith("budget"))
    assert [r[0] for r in budget[1:]] == ["swelu-s1", "swelu-s2", "swelu-long"]

    gen = p.tables["generations"]
    assert ["def", "swelu-long", "100", "f_swelu-long():"] in gen  # cells are stripped when parsed


def test_images_are_inline_pngs_and_files_are_written(study):
    runs, res = study
    p = _parse(res["html"])
    assert len(p.imgs) >= 5  # curves, fit, one SWELU figure per run
    for img in p.imgs:
        head, b64 = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 100
    html_text = res["html"].read_text()
    assert "http://" not in html_text and "https://" not in html_text
    with res["csv"].open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["swelu-long"]["val_loss"]) == pytest.approx(_loss(100_000))
    assert float(rows["swelu-s1"]["swelu:block.0.k"]) == pytest.approx(1.2)
    assert rows["swelu-s1"]["group"] == rows["swelu-s2"]["group"] != rows["swelu-long"]["group"]
    md = res["markdown"].read_text()
    assert "| swelu-long |" in md and "(report_files/fig-curves.png)" in md
    assert (res["markdown"].parent / "report_files" / "fig-curves.png").is_file()


def test_numbers_in_the_report_match_a_run_the_trainer_wrote(pretrain_run, diverged_runs, tmp_path):
    res = build_report([pretrain_run, diverged_runs["nan"]], tmp_path / "r" / "report.html")
    recs = [json.loads(x) for x in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    p = _parse(res["html"])
    row = _rows(p.tables["runs"])["pretrain"]
    assert _num(row["tokens"]) == train[-1]["tokens"] == 10 * 4 * 32
    assert _num(row["final val loss"]) == pytest.approx(evals[-1]["val_loss"], abs=5e-4)
    assert _num(row["final train loss"]) == pytest.approx(train[-1]["loss"], abs=5e-4)
    assert row["status"] == "finished" and "diverged" in _rows(p.tables["runs"])["nan"]["status"]
    assert _num(_rows(p.tables["cost"])["pretrain"]["devices"]) == 1  # the checkpoints' MANIFEST.json world_size
    samples = [json.loads(x) for x in (pretrain_run / "samples.jsonl").read_text().splitlines()]
    assert samples and any(r[1:3] == ["pretrain", str(samples[-1]["step"])] for r in p.tables["generations"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(study, tmp_path):
    runs, res = study
    html_path = res["html"]
    env = {**os.environ, "HOME": str(tmp_path)}
    # every <img> decoded: a test-only copy of the page reports naturalWidth of each image into the DOM
    probe = tmp_path / "probe.html"
    check = ('<script>window.addEventListener("load",()=>{const p=document.createElement("pre");p.id="probe";'
             'p.textContent=JSON.stringify([...document.images].map(i=>i.complete?i.naturalWidth:0));'
             'document.body.appendChild(p);});</script>')
    probe.write_text(html_path.read_text().replace("</body>", check + "</body>"))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = json.loads(dom.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0])
    assert len(widths) == len(_parse(html_path).imgs) and all(w > 100 for w in widths), widths
    # the report itself (no scripts): a screenshot, and no error about loading or decoding anything
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--enable-logging=stderr", "--v=0",
                        f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri()],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    bad = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line
           or ("ERROR" in line and any(w in line.lower() for w in ("image", "decode", "resource", "png")))]
    assert not bad, bad
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and float(pixels[..., :3].std()) > 0.05  # not blank
    shutil.copy(shot, html_path.parent / "screenshot.png")


def test_power_law_fit_declines_an_ill_conditioned_set_and_cpu_has_no_price():
    from lmlab.report.analysis import fit_power_law, resolve_price

    # nearly equal token counts and sizes: no fit instead of an overflow
    assert fit_power_law([1e6, 1e6 * (1 + 1e-12), 1e6], [3.0, 2.9, 3.1], [42034, 42035, 42034]) is None
    assert resolve_price(None, "cpu") == (None, "cpu (no GPU-hour price)")
