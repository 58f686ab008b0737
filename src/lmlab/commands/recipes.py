"""lmlab recipes: list the fine-tuning presets, or print one as a config file to copy and edit."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list",
                   help="list (default) or show NAME")
    p.add_argument("name", nargs="?", help="recipe name (for show)")
    p.add_argument("--stage", type=int, help="multi-stage recipes: print this stage's config (1-based)")
    p.add_argument("--micro-batch", type=int,
                   help="adapt to your devices: sequences per device per micro-step (the effective batch is kept "
                        "by gradient accumulation)")
    p.add_argument("--devices", type=int, default=1, help="with --micro-batch: number of devices (default 1)")
    p.add_argument("--json", action="store_true", help="list: JSON instead of a table")


def lr_text(lr: float) -> str:
    """1e-05 → 1e-5, 2.5e-06 → 2.5e-6, 0.003 → 3e-3."""
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def _fmt_lr(cfg: dict) -> str:
    t = cfg.get("train") or {}
    lr = float(t.get("lr", 0))
    ratio = t.get("min_lr_ratio")
    if t.get("schedule") in ("cosine", "linear") and ratio not in (None, 0, 0.0) and float(ratio) >= 0.2:
        return f"{lr_text(lr)} → {lr_text(lr * float(ratio))}"
    return lr_text(lr)


def run(args) -> int:
    import json

    from ..errors import ConfigError
    from ..recipes import adapt_to_devices, commented_header, list_recipes, load_recipe, recipe_text

    if args.action == "list":
        if args.name:
            raise ConfigError("lmlab recipes: to print a recipe use `lmlab recipes show NAME`")
        rows = []
        for meta in list_recipes():
            _, cfg = load_recipe(meta["name"])
            t, ft = cfg.get("train") or {}, cfg.get("finetune") or {}
            method = ft.get("method", "full") if t.get("objective", "pretrain") != "pretrain" else "pretrain"
            if t.get("objective") == "dpo":
                method += "+dpo"
            rows.append({"name": meta["name"], "method": method, "lr": _fmt_lr(cfg),
                         "batch": meta["effective_batch"], "steps": t.get("max_steps"),
                         "stages": len(meta["stages"]) or None, "source": meta.get("source", ""),
                         "description": meta.get("description", "")})
        if args.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
            return 0
        from rich.table import Table

        from ._common import console

        table = Table(title="lmlab recipes", title_justify="left")
        for col, just in (("recipe", "left"), ("method", "left"), ("LR", "right"), ("batch", "right"),
                          ("steps", "right"), ("description", "left")):
            table.add_column(col, justify=just, overflow="fold")
        for r in rows:
            steps = f"{r['steps']:,}" if r["steps"] else ""
            if r["stages"]:
                steps = f"{r['stages']} stages"
            table.add_row(r["name"], r["method"], r["lr"], str(r["batch"]), steps, r["description"])
        out = console()
        out.print(table)
        out.print("Print one: lmlab recipes show NAME > my.yaml   (--micro-batch N --devices K adapts it to your "
                  "devices)")
        return 0

    if not args.name:
        raise ConfigError("lmlab recipes show: name a recipe (see `lmlab recipes`)")
    if args.micro_batch is None:
        if args.devices != 1:
            raise ConfigError("--devices: give --micro-batch too (the sequences each device holds per micro-step)")
        sys.stdout.write(recipe_text(args.name, args.stage))
        return 0
    import yaml

    meta, cfg = load_recipe(args.name, args.stage)
    adapted = adapt_to_devices(cfg, args.micro_batch, args.devices)
    t = adapted["train"]
    sys.stdout.write(f"# {meta['name']}: {meta.get('description', '')}\n"
                     f"# on {args.devices} device(s): micro batch {t['batch_size']} × {t['grad_accum']} "
                     f"accumulation × {args.devices} = effective batch "
                     f"{t['batch_size'] * t['grad_accum'] * args.devices}\n")
    sys.stdout.write(commented_header({**meta, "effective_batch": t["batch_size"] * t["grad_accum"] * args.devices}))
    sys.stdout.write(yaml.safe_dump(adapted, sort_keys=False, allow_unicode=True, width=120))
    return 0
