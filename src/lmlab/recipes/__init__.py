"""Recipes: fine-tuning presets with their sources' numbers, as YAML files beside this module.

    meta, cfg = load_recipe("alpaca")                  # meta: the `recipe:` block; cfg: model/data/train/... sections
    cfg = adapt_to_devices(cfg, micro_batch=4, world_size=2)   # same effective batch, by gradient accumulation
    config = from_dict(cfg); validate(config)          # or write it out and `lmlab finetune -c FILE`

A recipe file is an ordinary config file plus a `recipe:` header (name, description, source,
effective_batch, and where known the data size `examples` and `epochs`). A multi-stage recipe adds a
`stages:` list in the format of `lmlab.train.stages` (each stage names what changes: `train: {lr: ...}`,
`data: {...}`), so `lmlab finetune -c` runs every stage in one run folder; `load_recipe(name, stage=k)`
returns stage k's sections alone (1-based). Neither block is a config section: both are moved into `meta`
here, so the sections load with `lmlab.config.from_dict` unchanged. `recipe_text` prints a recipe as a
config file (its header as comments) that `-c FILE` of every command reads; `header_of(text)` reads that
commented header back (`lmlab advise FILE` takes the data size from it). A config file without a `recipe:`
block (quickstart.yaml) is described by the first sentence of its leading comment.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent
META_KEYS = ("recipe", "stages")  # top-level blocks that describe the recipe, not the run


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name` (or `name` itself when it is a YAML file)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(r['name'] for r in list_recipes())}")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return d


def _meta(path: Path, d: dict[str, Any]) -> dict[str, Any]:
    meta = dict(d.get("recipe") or {})
    meta.setdefault("name", path.stem)
    if "description" not in meta:  # a plain config file: the first sentence of its leading comment
        meta["description"] = _first_sentence(path.read_text())
    train = d.get("train") or {}
    meta.setdefault("effective_batch", int(train.get("batch_size", 8)) * int(train.get("grad_accum", 1)))
    meta["stages"] = list(d.get("stages") or [])
    return meta


def _first_sentence(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    words = " ".join(ln for ln in lines if ln)
    m = re.search(r"\.(\s|$)", words)
    return words[:m.start() + 1] if m else words


def header_of(text: str) -> dict[str, Any]:
    """The `recipe:` header of a config file's text: a real `recipe:` block, or the one `recipe_text` wrote
    as comments (`# recipe:` and its indented lines). {} when there is none or it does not parse."""
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        d = {}
    if isinstance(d, dict) and isinstance(d.get("recipe"), dict):
        return dict(d["recipe"])
    block, inside = [], False
    for line in text.splitlines():
        body = line[2:] if line.startswith("# ") else None
        if body is not None and body.rstrip() == "recipe:":
            inside = True
        elif inside and (body is None or not body.startswith(" ")):
            break
        if inside:
            block.append(body)
    try:
        meta = (yaml.safe_load("\n".join(block)) or {}).get("recipe") if block else None
    except yaml.YAMLError:
        return {}
    return dict(meta) if isinstance(meta, dict) else {}


def commented_header(meta: dict[str, Any]) -> str:
    """A `recipe:` header as comment lines (what `header_of` reads back)."""
    keys = ("name", "description", "source", "effective_batch", "epochs", "examples")
    head = {k: meta[k] for k in keys if meta.get(k) is not None}
    text = yaml.safe_dump({"recipe": head}, sort_keys=False, allow_unicode=True, width=120)
    return "".join(f"# {line}\n" for line in text.splitlines())


def list_recipes() -> list[dict[str, Any]]:
    """The `recipe:` header of every shipped recipe, sorted by name."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        out.append(_meta(path, _read(path)))
    return out


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` sections updated key by key with `changes` (two levels: section → key)."""
    out = copy.deepcopy(base)
    for section, values in (changes or {}).items():
        if section == "name":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"recipe stage: {section} must be a mapping of keys, got {values!r}")
        out.setdefault(section, {}).update(copy.deepcopy(values))
    return out


def load_recipe(name: str, stage: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, config sections) of a recipe; with `stage` (1-based) the sections of that stage of a
    multi-stage recipe. The sections validate with `lmlab.config.from_dict` + `validate`."""
    path = recipe_path(name)
    d = _read(path)
    meta = _meta(path, d)
    cfg = {k: v for k, v in d.items() if k not in META_KEYS}
    if stage is not None:
        stages = meta["stages"]
        if not stages:
            raise ConfigError(f"recipe {meta['name']!r} has no stages")
        if not 1 <= stage <= len(stages):
            raise ConfigError(f"--stage: recipe {meta['name']!r} has stages 1 to {len(stages)}, got {stage}")
        cfg = merge(cfg, stages[stage - 1])
        meta["stage"] = stage
    return meta, cfg


def effective_batch(cfg: dict[str, Any], world_size: int = 1) -> int:
    """Sequences per optimizer step: batch_size × grad_accum × devices."""
    train = cfg.get("train") or {}
    return int(train.get("batch_size", 8)) * int(train.get("grad_accum", 1)) * world_size


def adapt_to_devices(cfg: dict[str, Any], micro_batch: int, world_size: int = 1,
                     target: int | None = None) -> dict[str, Any]:
    """A copy of `cfg` whose micro batch is at most `micro_batch` per device on `world_size` devices, with the
    gradient accumulation that keeps the effective batch (`target`, default the recipe's own) exact.

    When `micro_batch × world_size` does not divide the effective batch, the micro batch is lowered to the
    largest one that does; a `world_size` that does not divide it is an error (no exact split exists)."""
    if micro_batch < 1 or world_size < 1:
        raise ConfigError(f"micro batch and device count must be >= 1, got {micro_batch} and {world_size}")
    target = effective_batch(cfg) if target is None else int(target)
    if target % world_size:
        raise ConfigError(f"an effective batch of {target} cannot be split evenly over {world_size} devices; "
                          f"choose a device count that divides it")
    per_device = target // world_size
    m = next(b for b in range(min(micro_batch, per_device), 0, -1) if per_device % b == 0)
    out = copy.deepcopy(cfg)
    out.setdefault("train", {}).update(batch_size=m, grad_accum=per_device // m)
    return out


def as_config_text(text: str) -> str:
    """A recipe file's text with its `recipe:` header turned into comments: a config file that `-c FILE` reads
    as it is (a `stages:` list stays: `lmlab finetune` runs it)."""
    out, inside = [], False
    for line in text.splitlines():
        top = line[:1] not in ("", " ", "#", "-")
        if top:
            inside = line.split(":", 1)[0].strip() == "recipe"
        out.append(f"# {line}" if inside and line.strip() else line)
    return "\n".join(out) + "\n"


def recipe_text(name: str, stage: int | None = None) -> str:
    """The recipe as a config file (its header as comments), or, for a stage, that stage's sections."""
    path = recipe_path(name)
    if stage is None:
        return as_config_text(path.read_text())
    meta, cfg = load_recipe(name, stage)
    label = meta["stages"][stage - 1].get("name", f"stage {stage}")
    head = (f"# {meta['name']}, stage {stage} of {len(meta['stages'])} ({label}): {meta.get('description', '')}\n"
            f"# Set model.name to the previous stage's final/ folder.\n") + commented_header(meta)
    return head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=120)
