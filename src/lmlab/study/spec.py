"""A study file → one run spec (a `Cell`) per run: its resolved config, its name, its GPU group.

    study = load_study("examples/studies/swelu-vs-baselines.yaml")
    for cell in study.cells:
        cell.name, cell.labels, cell.config, cell.run_dir, cell.gpus, cell.gpus_per_run

The file (YAML):

    name: swelu-vs-baselines            # the study; run folders go to out_dir/<cell name>
    out_dir: studies/swelu-vs-baselines # default: studies/<name>, relative to the working directory
    base: base.yaml                     # optional run config, relative to the study file
    config: {model: {...}, data: {...}, train: {...}}   # inline base config (wins over `base`)
    hardware: h100                      # planner's hardware table: --dry-run time and cost, the report's price
    price_per_hour: 2.5                 # optional, per GPU-hour (default: the hardware table's)
    throughput: 5000                    # optional tokens/s per run, measured, to time runs the planner cannot (CPU)
    gpus: [0, 1, 2, 3, 4, 5]            # GPU ids the local executor may hand out (default: all visible, none on CPU)
    gpus_per_run: 2                     # GPUs per node per run (default: 1 with GPUs, 0 on CPU)
    nodes: 1                            # nodes per run (slurm)
    max_parallel: 3                     # runs at once (default: as many as GPU groups; 1 on CPU)
    grid:                               # every combination; axes data, budget, model, seed first, in that order
      data: {slimpajama: {data.source: /data/slimpajama}, wiki: /data/wikipedia}
      budget: [20, 100]                 # shorthand: train.token_ratio, labels 20x, 100x
      model: {swelu: {model.name: mamba-swelu-tiny}, silu: {model.name: mamba-swelu-tiny, model.activation: silu}}
      seed: [1, 2, 3]                   # train.seed, labels s1, s2, s3
      train.lr: [1e-3, 3e-3]            # any config key is an axis too
    runs:                               # explicit runs, added to the grid's
      - {name: wiki-100x, gpus: [4, 5], set: {data.source: /data/wikipedia, train.token_ratio: 100}}
    slurm: {partition: gpu, timeout_min: 2880}   # submitit parameters for --executor slurm

An axis value is a mapping label → overrides (dotted keys or nested sections), or a list of values of the
axis's key (data → data.source, budget → train.token_ratio, model → model.name, seed → train.seed, a dotted
axis name → that key). A cell is named by its labels joined with "-" (data-budget-model-seed-...), so names
stay put when the study grows. Every cell's config is validated before anything runs; an error names the cell.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, from_dict, validate
from ..errors import ConfigError

# axis -> the config key its plain values set
SHORTHAND = {"data": "data.source", "budget": "train.token_ratio", "model": "model.name", "seed": "train.seed"}
FIRST_AXES = ("data", "budget", "model", "seed")
STUDY_KEYS = {"name", "out_dir", "base", "config", "hardware", "price_per_hour", "throughput", "gpus",
              "gpus_per_run", "nodes", "max_parallel", "grid", "runs", "slurm", "ray", "description"}
RUN_KEYS = {"name", "gpus", "gpus_per_run", "nodes", "set"}


@dataclass
class Cell:
    """One run of a study: what it trains (config), where (run_dir) and on how many GPUs."""

    name: str
    config: Config
    run_dir: Path
    labels: dict[str, str] = field(default_factory=dict)  # axis -> label (explicit runs: {"run": name})
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, applied to the base config
    gpus: tuple[int, ...] | None = None  # a pinned GPU group; None: any free group of gpus_per_run GPUs
    gpus_per_run: int = 0  # per node; 0 = CPU
    nodes: int = 1


@dataclass
class Study:
    name: str
    out_dir: Path
    cells: list[Cell]
    gpus: list[int]  # GPU ids the local executor may hand out
    max_parallel: int | None = None
    hardware: str | None = None
    price_per_hour: float | None = None
    throughput: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    text: str = ""  # the study file as written (copied into out_dir/study.yaml when it runs)


# ------------------------------------------------------------------------------------------- loading
def load_study(path: str | Path, *, out_dir: str | Path | None = None, gpus: list[int] | None = None) -> Study:
    """Parse and validate a study file; `out_dir` and `gpus` replace the file's (the CLI's --out-dir, --gpus)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {str(p)!r} not found")
    text = p.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping (name, config, grid, runs, ...)")
    study = study_from_dict(raw, base_dir=p.parent, out_dir=out_dir, gpus=gpus)
    study.path, study.text = p, text
    return study


def study_from_dict(raw: dict, *, base_dir: Path = Path("."), out_dir: str | Path | None = None,
                    gpus: list[int] | None = None) -> Study:
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"study: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    name = str(raw.get("name") or "study")
    _check_name(name, "study name")
    out = Path(out_dir or raw.get("out_dir") or Path("studies") / name)
    base = _base_config(raw, base_dir)
    if gpus is None:
        gpus = [int(g) for g in raw["gpus"]] if raw.get("gpus") is not None else _visible_gpus()
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"gpus: an id appears twice in {gpus}")
    per_run = int(raw.get("gpus_per_run", 1 if gpus else 0))
    nodes = int(raw.get("nodes", 1))
    if per_run < 0 or nodes < 1:
        raise ConfigError("gpus_per_run must be >= 0 and nodes >= 1")
    cells = [_make_cell(name_, labels, sets, base, out, None, per_run, nodes)
             for name_, labels, sets in _grid(raw.get("grid") or {})]
    for i, r in enumerate(raw.get("runs") or []):
        cells.append(_explicit(r, i, base, out, per_run, nodes))
    if not cells:
        raise ConfigError("study: no runs (give a grid, a runs list, or both)")
    seen: dict[str, int] = {}
    for c in cells:
        seen[c.name] = seen.get(c.name, 0) + 1
        if seen[c.name] == 2:
            raise ConfigError(f"study: two runs are named {c.name!r}; give explicit runs distinct names")
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and int(max_parallel) < 1:
        raise ConfigError(f"max_parallel: must be >= 1, got {max_parallel}")
    for key in ("price_per_hour", "throughput"):
        if raw.get(key) is not None and not float(raw[key]) >= 0:
            raise ConfigError(f"{key}: must be a number >= 0, got {raw[key]!r}")
    return Study(name=name, out_dir=out, cells=cells, gpus=list(gpus),
                 max_parallel=int(max_parallel) if max_parallel is not None else None,
                 hardware=raw.get("hardware"), price_per_hour=_opt_float(raw.get("price_per_hour")),
                 throughput=_opt_float(raw.get("throughput")), slurm=dict(raw.get("slurm") or {}),
                 ray=dict(raw.get("ray") or {}))


def _opt_float(v) -> float | None:
    return float(v) if v is not None else None


def _visible_gpus() -> list[int]:
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return list(range(len([g for g in env.split(",") if g.strip()])))
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no CUDA: a CPU study
        return []


def _base_config(raw: dict, base_dir: Path) -> dict:
    base: dict = {}
    if raw.get("base"):
        f = Path(raw["base"])
        f = f if f.is_absolute() else base_dir / f
        if not f.is_file():
            raise ConfigError(f"base: config file {str(f)!r} not found")
        base = yaml.safe_load(f.read_text()) or {}
    inline = raw.get("config") or {}
    if not isinstance(base, dict) or not isinstance(inline, dict):
        raise ConfigError("base/config: expected a mapping of sections (model, data, train)")
    out = copy.deepcopy(base)
    for k, v in _flatten(inline).items():
        _set(out, k, v)
    return out


# ------------------------------------------------------------------------------------------- the grid
def _grid(grid: dict) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(name, labels, overrides) for every combination of the grid's axes."""
    if not isinstance(grid, dict):
        raise ConfigError("grid: expected a mapping of axes (data, budget, model, seed, or config keys)")
    if not grid:
        return []
    axes = [a for a in FIRST_AXES if a in grid] + [a for a in grid if a not in FIRST_AXES]
    cells: list[tuple[list[str], dict[str, str], dict[str, Any]]] = [([], {}, {})]
    for axis in axes:
        values = _axis_values(axis, grid[axis])
        cells = [(names + [label], {**labels, axis: label}, {**sets, **vsets})
                 for names, labels, sets in cells for label, vsets in values]
    return [("-".join(names), labels, sets) for names, labels, sets in cells]


def _axis_values(axis: str, spec: Any) -> list[tuple[str, dict[str, Any]]]:
    key = SHORTHAND.get(axis, axis if "." in axis else None)
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(spec, dict):
        for label, v in spec.items():
            label = str(label)
            _check_name(label, f"grid.{axis} label")
            if isinstance(v, dict):
                out.append((label, _flatten(v)))
            elif key is not None:
                out.append((label, {key: v}))
            else:
                raise ConfigError(f"grid.{axis}.{label}: expected a mapping of config keys (e.g. train.lr: 1e-3)")
    elif isinstance(spec, list):
        if key is None:
            raise ConfigError(f"grid.{axis}: a list needs a config key as the axis name (data, budget, model, "
                              f"seed, or e.g. train.lr); otherwise give label: {{key: value}}")
        for v in spec:
            out.append((_label(axis, v), {key: v}))
    else:
        raise ConfigError(f"grid.{axis}: expected a list of values or a mapping label -> settings")
    if not out:
        raise ConfigError(f"grid.{axis}: no values")
    labels = [lbl for lbl, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"grid.{axis}: two values have the same label; use a mapping label -> settings")
    return out


def _label(axis: str, v: Any) -> str:
    if axis == "budget":
        return f"{v:g}x" if isinstance(v, (int, float)) else str(v)
    if axis == "seed":
        return f"s{v}"
    if axis == "data":
        v = Path(str(v).rstrip("/")).name.split(".")[0] or str(v)
    elif axis == "model":
        v = str(v).rstrip("/").split("/")[-1]
    elif "." in axis:
        v = f"{axis.split('.')[-1]}{v}"
    return re.sub(r"[^A-Za-z0-9_.+=]+", "_", str(v)).strip("_") or axis


def _explicit(r: Any, i: int, base: dict, out: Path, per_run: int, nodes: int) -> Cell:
    if not isinstance(r, dict) or not r.get("name"):
        raise ConfigError(f"runs[{i}]: expected a mapping with a name (and gpus, nodes, set)")
    unknown = sorted(set(r) - RUN_KEYS)
    if unknown:
        raise ConfigError(f"runs[{i}]: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(RUN_KEYS))}")
    name = str(r["name"])
    _check_name(name, f"runs[{i}].name")
    pinned = tuple(int(g) for g in r["gpus"]) if r.get("gpus") is not None else None
    g = int(r.get("gpus_per_run", len(pinned) if pinned is not None else per_run))
    if pinned is not None and len(pinned) != g:
        raise ConfigError(f"runs[{i}] ({name}): gpus {list(pinned)} is not a group of gpus_per_run={g}")
    return _make_cell(name, {"run": name}, _flatten(r.get("set") or {}), base, out, pinned, g,
                      int(r.get("nodes", nodes)))


def _make_cell(name: str, labels: dict, sets: dict, base: dict, out: Path, pinned, per_run: int,
               nodes: int) -> Cell:
    _check_name(name, "run name")
    d = copy.deepcopy(base)
    for k, v in sets.items():
        _set(d, k, v)
    d.setdefault("run", {})
    d["run"] = {**(d["run"] or {}), "name": name, "out_dir": str(out)}
    try:
        cfg = from_dict(d)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"run {name}: {e}") from None
    return Cell(name=name, config=cfg, run_dir=out / name, labels=labels, overrides=sets, gpus=pinned,
                gpus_per_run=per_run, nodes=nodes)


# ------------------------------------------------------------------------------------------- helpers
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}, "model.name": "x"} -> {"train.lr": 1, "model.name": "x"}."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if "." not in key and isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key!r}: expected section.key (e.g. train.lr, model.name)")
    section = d.setdefault(parts[0], {})
    if section is None:
        section = d[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping of keys")
    section[parts[1]] = value


def _check_name(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", name):
        raise ConfigError(f"{what} {name!r}: use letters, digits and _ . + = - (it names a folder)")
