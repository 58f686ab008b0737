"""Read run folders into plain numbers. Only reads: config.yaml, run.json, metrics.jsonl, samples.jsonl, eval/*.json.

Time and cost come from the runs' own records:
- wall time is the sum of each session's span in metrics.jsonl (from its `start`/`resume` event to its last
  record), so a resumed run counts the time it really ran; without timed records, run.json's started → ended;
- GPU-hours = wall hours × devices (run.json `world_size` or `gpus`; 1 when absent, e.g. a CPU run);
- energy (kWh) only where measured: run.json `energy_kwh`, or the GPUs' `power_w` in `kind: "system"` (or
  "gpu") records integrated over time;
- cost = GPU-hours × price per GPU-hour (given, from the study file, or the planner's hardware table).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from .. import runs
from ..errors import LmlabError
from ..fsutil import read_jsonl
from ..monitor.runread import last_applied, num, objective_metrics, stop_info

# config keys that do not change what a run computes: runs differing only in these (and train.seed) are seeds
# of one configuration
NON_SEMANTIC = {("train", "seed"), ("run", "name"), ("run", "out_dir"), ("train", "threads"), ("train", "progress"),
                ("train", "device")}
BUDGET_KEYS = {("train", "max_steps"), ("train", "max_tokens"), ("train", "token_ratio")}


@dataclass
class Run:
    dir: Path
    name: str
    config: dict
    manifest: dict
    train: list[dict] = field(default_factory=list)  # one record per step (last occurrence wins), time-annotated
    evals: list[dict] = field(default_factory=list)
    swelu: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    perplexity: dict[str, dict] = field(default_factory=dict)  # from eval/*.json, later files win
    tasks: dict[str, dict] = field(default_factory=dict)
    wall_s: float = 0.0
    devices: int = 1
    energy_kwh: float | None = None
    hardware: str | None = None

    @property
    def seed(self):
        return self.config.get("train", {}).get("seed")

    @property
    def params(self) -> int | None:
        return self.manifest.get("parameters")

    @property
    def tokens(self) -> int | None:
        if self.train:
            return self.train[-1].get("tokens")
        return (self.manifest.get("summary") or {}).get("tokens")

    @property
    def gpu_hours(self) -> float:
        return self.wall_s / 3600 * self.devices

    @property
    def val_loss(self) -> float | None:
        """The last measured validation loss (NaN for a diverged run); None when none was measured (a run
        without held-out data logs null)."""
        if self.evals:  # evaluated: its own records say, null included
            measured = [num(e.get("val_loss")) for e in self.evals if num(e.get("val_loss")) is not None]
            return measured[-1] if measured else None
        return num((self.manifest.get("summary") or {}).get("val_loss"))

    @property
    def val_ppl(self) -> float | None:
        v = self.val_loss
        return math.exp(min(v, 50)) if v is not None and math.isfinite(v) else v

    @property
    def train_loss(self) -> float | None:
        """The last logged training loss (metrics.jsonl writes NaN as the string "nan": read as a float), of a log
        window in which a step was applied (one the guard skipped whole logs NaN without diverging)."""
        rec = last_applied(self.train)
        return num(rec.get("loss")) if rec is not None else None

    @property
    def objective(self) -> dict[str, float]:
        """The objective's own metrics in the last train record (rewards, kl, ...): see monitor.runread."""
        return objective_metrics(self.train[-1]) if self.train else {}

    @property
    def diverged(self) -> bool:
        """The run ended with a non-finite training loss, or its guard stopped it."""
        last = self.train_loss
        return (last is not None and not math.isfinite(last)) or stop_info(self.manifest, self.events)[2]

    @property
    def status_text(self) -> str:
        """run.json's status, marked when the run diverged: 'failed (diverged)', 'stopped (diverged)'."""
        return f"{self.status} (diverged)" if self.diverged and self.status != "diverged" else self.status

    @property
    def unigram_loss(self) -> float | None:
        u = (self.manifest.get("summary") or {}).get("unigram_ppl")
        return math.log(u) if u else None

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    def config_key(self, ignore: set = frozenset()) -> str:
        """The config as canonical JSON without the non-semantic keys (and `ignore`)."""
        drop = NON_SEMANTIC | set(ignore)
        cfg = {s: {k: v for k, v in (vals or {}).items() if (s, k) not in drop} for s, vals in self.config.items()
               if isinstance(vals, dict)}
        return json.dumps(cfg, sort_keys=True, default=str)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders named directly, or found below study folders (two levels deep), in a stable order
    (lmlab.runs.find_runs); a path that holds no run is an error naming it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise LmlabError(f"{p}: no such run or study folder")
        found = runs.find_runs([p])
        if not found:
            raise LmlabError(f"{p}: not a run folder and holds no run folders (no run.json or config.yaml)")
        out += [f for f in found if f.resolve() not in {o.resolve() for o in out}]
    return out


def load_run(path: Path | str) -> Run:
    path = Path(path)
    manifest = _read_json(path / "run.json") or {}
    config = _read_config(path / "config.yaml")
    run = Run(dir=path, name=manifest.get("name") or path.name, config=config, manifest=manifest)
    records = read_jsonl(path / "metrics.jsonl")
    _annotate_time(records)
    run.wall_s = records[-1]["_active_s"] if records and "_active_s" in records[-1] else _manifest_wall(manifest)
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}, "swelu": {}}
    for rec in records:
        if rec.get("kind") in by_kind:
            step = num(rec.get("step"))  # a step redone after a resume: the last one counts
            by_kind[rec["kind"]][int(step) if step is not None and math.isfinite(step) else 0] = rec
    run.train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    run.evals = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]
    run.swelu = [by_kind["swelu"][s] for s in sorted(by_kind["swelu"])]
    run.events = [rec for rec in records if rec.get("kind") == "event"]
    run.samples = read_jsonl(path / "samples.jsonl")
    run.devices = _devices(manifest, path)
    run.energy_kwh = _energy(manifest, records)
    run.hardware = manifest.get("hardware") or manifest.get("gpu")
    for f in _eval_files(path):
        data = _read_json(f) or {}
        for src, r in (data.get("perplexity") or {}).items():
            run.perplexity[src] = r
        for task, r in (data.get("tasks") or {}).items():
            run.tasks[task] = r
    return run


def _read_config(path: Path) -> dict:
    """The run's config with today's defaults filled in (so a key added to lmlab since the run was made does not
    split seed groups), or the raw YAML when it no longer validates."""
    if not path.is_file():
        return {}
    try:
        from ..config import load_config

        return load_config(path).to_dict()
    except Exception:  # an older or foreign config: compare what is written
        return yaml.safe_load(path.read_text()) or {}


def _annotate_time(records: list[dict]) -> None:
    """Give each record `_active_s`: seconds the run had been running when it was written, summed over sessions."""
    active, prev = 0.0, None
    for rec in records:
        t = rec.get("time")
        if not isinstance(t, int | float):
            continue
        if rec.get("kind") == "event" and rec.get("event") in ("start", "resume"):
            prev = t  # a new session: the gap since the last record was not running
        elif prev is not None and t >= prev:
            active += t - prev
            prev = t
        else:
            prev = t
        rec["_active_s"] = active


def _manifest_wall(m: dict) -> float:
    try:
        a = datetime.fromisoformat(m["started"])
        b = datetime.fromisoformat(m["ended"])
        return max(0.0, (b - a).total_seconds())
    except (KeyError, TypeError, ValueError):
        return 0.0


def _devices(m: dict, path: Path) -> int:
    """run.json's world_size / gpus, else the newest checkpoint's MANIFEST.json world_size, else 1."""
    for key in ("world_size", "gpus", "num_gpus"):
        v = m.get(key)
        if isinstance(v, list):
            return max(1, len(v))
        if isinstance(v, int) and v > 0:
            return v
    for ckpt in reversed(runs.checkpoints(path)):
        v = (_read_json(ckpt.path / runs.MANIFEST) or {}).get("world_size")
        if isinstance(v, int) and v > 0:
            return v
    return 1


def _energy(m: dict, records: list[dict]) -> float | None:
    if isinstance(m.get("energy_kwh"), int | float):
        return float(m["energy_kwh"])
    joules, prev = 0.0, None
    measured = False
    for rec in records:
        if rec.get("kind") == "event" and rec.get("event") in ("start", "resume"):
            prev = None
        if rec.get("kind") not in ("gpu", "system") or not isinstance(rec.get("time"), int | float):
            continue
        w = _power(rec)
        if w is None:
            continue
        measured = True
        if prev is not None:
            joules += (rec["time"] - prev[0]) * (w + prev[1]) / 2
        prev = (rec["time"], w)
    return joules / 3.6e6 if measured else None


def _power(rec: dict) -> float | None:
    """Watts drawn by the run's GPUs in one record: `power_w` (a number or a list), or the sum over `gpus`."""
    w = rec.get("power_w")
    if isinstance(w, list):
        w = sum(x for x in w if isinstance(x, int | float)) if w else None
    if isinstance(w, int | float):
        return float(w)
    gpus = [g.get("power_w") for g in rec.get("gpus") or [] if isinstance(g, dict)]
    gpus = [x for x in gpus if isinstance(x, int | float)]
    return float(sum(gpus)) if gpus else None


def _eval_files(path: Path) -> list[Path]:
    files = list((path / "eval").glob("*.json")) if (path / "eval").is_dir() else []
    return sorted(files, key=lambda f: ((_read_json(f) or {}).get("created", ""), f.name))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
