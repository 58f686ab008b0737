"""Multi-stage runs: several trainings in one YAML and one run folder, each stage starting from the previous
stage's output.

    model: {name: runs/base}                  # the sections every stage shares
    finetune: {method: lora}
    run: {name: chat, out_dir: runs}
    stages:
      - name: sft
        data: {source: [alpaca.json, stdlib-instruct]}
        train: {lr: 2e-4, max_steps: 1000}
      - name: dpo
        data: {source: pairs.jsonl}
        train: {objective: dpo, lr: 5e-6, max_steps: 200}

Any objective can follow any other: SFT → DPO (or IPO, SimPO, ORPO, KTO) as above, or SFT → GRPO:

      - name: grpo
        data: {source: arithmetic}                  # prompts (lmlab.data.prompts)
        train: {objective: grpo, lr: 5e-4, max_steps: 200}
        rl: {num_generations: 8}

A stage's sections override the shared ones key by key; `key=value` overrides from the command line apply to
every stage, last. Stage i > 0 starts from stage i − 1's model (its final/ folder, or the base with its LoRA
adapters merged) and tokenizer. The run folder:

    runs/chat/
      stages.yaml             the spec as run (shared sections, stages, command-line overrides)
      stages.json             per stage: folder, status, steps, validation loss, final model
      stages/0-sft/           an ordinary run folder (config.yaml, metrics.jsonl, checkpoints/, final/)
      stages/1-dpo/

Every stage's config is checked before the first step. Running the same spec again (`train_stages`, or
`resume_stages(run_dir)`) skips finished stages and resumes the unfinished one from its latest checkpoint,
exactly as `lmlab resume` would.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from ..config import Config, DataConfig, apply_overrides, from_dict, validate
from ..errors import ConfigError
from ..fsutil import atomic_write_text

SPEC, SUMMARY, STAGES = "stages.yaml", "stages.json", "stages"


def load_spec(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{p}: stages: expected a non-empty list of stages")
    return spec


def stage_configs(spec: dict, overrides: list[str] = ()) -> list[tuple[str, Config]]:
    """(name, Config) per stage: shared sections ∪ the stage's ∪ overrides, each validated."""
    shared = {k: v for k, v in spec.items() if k != "stages"}
    out, names = [], set()
    for i, stage in enumerate(spec["stages"]):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping of sections, got {stage!r}")
        name = str(stage.get("name", f"stage{i}"))
        if not name.replace("-", "").replace("_", "").isalnum() or name in names:
            raise ConfigError(f"stages[{i}].name: {name!r} must be unique letters, digits, - or _")
        names.add(name)
        merged = {k: dict(v or {}) for k, v in shared.items()}
        for section, values in stage.items():
            if section == "name":
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"stages[{i}].{section}: expected a mapping of keys, got {values!r}")
            merged.setdefault(section, {}).update(values)
        try:
            cfg = from_dict(apply_overrides(merged, list(overrides)))
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from None
        out.append((name, cfg))
    return out


def train_stages(path: str | Path, overrides: list[str] = (), *, echo=print, preflight=None) -> Path:
    """Run (or continue) the stages of the spec at `path`; returns the run folder. `preflight` as for
    `lmlab.train.loop.train` (the planner's memory line before each stage)."""
    from .. import runs

    spec = load_spec(path)
    stages = stage_configs(spec, overrides)
    first = stages[0][1]
    if first.run.name:
        name = first.run.name
    elif Path(first.model.name).is_dir():  # named after the run it continues, not after "final"
        from ..runs import base_label

        name = f"{base_label(first.model.name)}-stages-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        name = runs.default_name(first.model.name) + "-stages"
    run_dir = Path(first.run.out_dir) / name
    saved = run_dir / SPEC
    if saved.is_file():
        before = yaml.safe_load(saved.read_text())
        if before != {"spec": spec, "overrides": list(overrides)}:
            raise ConfigError(f"{run_dir} holds a different stage spec; pick another run.name or "
                              f"resume it with its own {SPEC}")
    else:
        runs.create_run_dir(first.run.out_dir, name)
        atomic_write_text(saved, yaml.safe_dump({"spec": spec, "overrides": list(overrides)}, sort_keys=False))
    return _run(run_dir, stages, echo, preflight)


def resume_stages(run_dir: str | Path, *, echo=print, preflight=None) -> Path:
    """Continue a multi-stage run folder with the spec it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / SPEC).is_file():
        raise ConfigError(f"{run_dir}: not a multi-stage run (no {SPEC})")
    saved = yaml.safe_load((run_dir / SPEC).read_text())
    return _run(run_dir, stage_configs(saved["spec"], saved["overrides"]), echo, preflight)


def _run(run_dir: Path, stages: list[tuple[str, Config]], echo, preflight=None) -> Path:
    from ..runs.load import resolve_base
    from .loop import train

    summary = _read_summary(run_dir)
    previous: Path | None = None
    for i, (name, cfg) in enumerate(stages):
        stage_dir = run_dir / STAGES / f"{i}-{name}"
        cfg.run.out_dir, cfg.run.name = str(run_dir / STAGES), stage_dir.name
        if previous is not None:  # from the previous stage's model and tokenizer
            cfg.model.name = cfg.data.tokenizer = resolve_base(str(previous))
        elif Path(cfg.model.name).is_dir():  # a base folder brings its tokenizer unless one is named
            cfg.model.name = str(Path(resolve_base(cfg.model.name)).resolve())
            if cfg.data.tokenizer == DataConfig().tokenizer:
                cfg.data.tokenizer = cfg.model.name
        record = summary.setdefault(name, {"index": i, "dir": str(stage_dir.relative_to(run_dir))})
        status = _status(stage_dir)
        echo(f"stage     {i} {name}: " + {"finished": "finished already, skipped", "new": "starting",
                                          "partial": "resuming"}[status])
        if status == "partial" and not (stage_dir / "config.yaml").is_file():
            shutil.rmtree(stage_dir)  # died before it saved anything: start it over
            status = "new"
        if status != "finished":
            record["status"] = "running"
            _write_summary(run_dir, summary)
            if status == "new":
                train(cfg, echo=echo, preflight=preflight)
            else:
                from ..config import load_config

                train(load_config(stage_dir / "config.yaml"), stage_dir, echo=echo, preflight=preflight)
        manifest = json.loads((stage_dir / "run.json").read_text())
        record.update(status=manifest.get("status"), **{k: manifest.get("summary", {}).get(k)
                                                         for k in ("step", "val_loss", "final")})
        _write_summary(run_dir, summary)
        if manifest.get("status") != "finished":
            echo(f"stage     {i} {name} ended {manifest.get('status')}; continue with the same command")
            return run_dir
        previous = stage_dir
    echo(f"stages    all {len(stages)} finished; the model: {summary[stages[-1][0]].get('final')}")
    return run_dir


def _status(stage_dir: Path) -> str:
    if not stage_dir.exists():
        return "new"
    manifest = stage_dir / "run.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "finished":
        return "finished"
    return "partial"


def _read_summary(run_dir: Path) -> dict:
    p = run_dir / SUMMARY
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=1))
