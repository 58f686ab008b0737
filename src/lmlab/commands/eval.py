"""lmlab eval: perplexity per text source and benchmark tasks (lm-eval) for a run or any causal LM.

    lmlab eval runs/r1                                  validation perplexity + the four tasks on local fixtures
    lmlab eval runs/r1 --data notes/ hf:wikitext@test   ... plus perplexity on other sources, one line each
    lmlab eval runs/base runs/tuned --limit 50          both, then the deltas (second − first)

A run's own validation split is what it held out: text for pretraining, the held-out examples of a fine-tuned
run (their assistant turns, in the run's template), the held-out pairs of a preference run (lmlab.eval.
perplexity_sources.run_split_score). Given two runs, each model is also scored on the other run's split
("val <run>"), so base and tuned meet on the same data; a split that cannot be scored says why in its row.

Results go to <run>/eval/<name>.json (a model folder: <folder>/eval/; a hub id: ./eval/<id>/), and are printed.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ._common import CONFIG_DEFAULT, add_alias_flags, add_device_flag


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", metavar="RUN|PATH",
                   help="run folder, model folder or hub id; give two to compare (second − first)")
    p.add_argument("--data", nargs="+", default=[], action="extend", metavar="SRC",
                   help="more text sources to report perplexity on, one result each (file, folder, glob, "
                        "jsonl, parquet, stdlib, hf:NAME)")
    p.add_argument("--tasks", default=",".join(_default_tasks()),
                   help="comma-separated benchmarks: lambada, hellaswag, piqa, winogrande; 'none' to skip")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--hub", action="store_true", help="run tasks on their hub datasets (needs the network) "
                   "instead of the local fixtures")
    p.add_argument("--no-val", action="store_true", help="skip the run's own validation split")
    add_alias_flags(p, ("--seq-len",), help={"--seq-len": "perplexity window (default: the run's, else 256)"})
    p.add_argument("--max-tokens", type=int, default=262_144, help="tokens scored per source (0 = all)")
    add_alias_flags(p, ("--text-field",), default=CONFIG_DEFAULT)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--bootstrap-iters", type=int, default=0, help="lm-eval stderr bootstrap (0 = off)")
    add_device_flag(p)
    p.add_argument("--name", default=None, help="results file name (default: a timestamp)")


def _default_tasks():
    from ..eval.harness import DEFAULT_TASKS

    return DEFAULT_TASKS


def run(args) -> int:
    from ..errors import ConfigError

    if len(args.models) > 2:
        raise ConfigError("give one model, or two to compare")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    tasks = [] if args.tasks.strip().lower() in ("", "none") else _parse(args.tasks)
    results = []
    for spec in args.models:
        others = [m for m in args.models if m != spec] if not args.no_val else []
        res = evaluate_model(spec, data=args.data, tasks=tasks, limit=args.limit, hub=args.hub,
                             val=not args.no_val, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                             text_field=args.text_field, batch_size=args.batch_size,
                             bootstrap_iters=args.bootstrap_iters, device=args.device, name=args.name,
                             other_runs=others)
        print(format_results(res))
        print(f"wrote     {res['path']}")
        results.append(res)
    if len(results) == 2:
        print(format_deltas(results[0], results[1]))
    return 0


def _parse(text):
    from ..eval.harness import parse_tasks

    return parse_tasks(text)


def run_folder_of(spec: str) -> Path | None:
    """The run folder `spec` belongs to (a run folder itself, or its final/; a multi-stage folder stands for its
    last finished stage), else None."""
    from ..runs import resolve_stage, run_of

    path = resolve_stage(spec) if Path(spec).is_dir() else Path(spec)
    run = run_of(path)
    return run if run is not None and (run == path.resolve() or path.name == "final") else None


def output_dir(spec: str) -> Path:
    run_dir = run_folder_of(spec)
    if run_dir is not None:
        return run_dir / "eval"
    if Path(spec).is_dir():
        return Path(spec) / "eval"
    return Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def evaluate_model(spec: str, *, data=(), tasks=(), limit=None, hub=False, val=True, seq_len=None,
                   max_tokens=262_144, text_field="text", batch_size=8, bootstrap_iters=0, device="auto",
                   name=None, out_dir: Path | None = None, other_runs=()) -> dict:
    """Evaluate one model and write its results JSON. Returns the results (with "path").

    With `val`, a run is scored on its own split ("validation"); `other_runs` (run folders or their final/)
    add one entry each, "val <run name>", the model scored on that run's split — and, for symmetry, the
    model's own split under its run's name too. An entry that cannot be scored is {"error": why}."""
    import torch

    from ..eval.harness import evaluate_tasks, lm_eval_version, model_max_length
    from ..eval.perplexity_sources import source_perplexity
    from ..inference import load_for_inference

    t0 = time.perf_counter()
    model, tok = load_for_inference(spec, device)
    run_dir = run_folder_of(spec)
    asked_seq_len = seq_len  # a text split of another run is scored in that run's windows unless asked
    ppl: dict[str, dict] = {}
    masking = False
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from ..config import load_config

        cfg = load_config(run_dir / "config.yaml")
        seq_len = seq_len or cfg.data.seq_len
        masking = cfg.data.document_masking and getattr(model, "supports_packed_documents", False)
        if val:
            ppl["validation"] = _split_entry(model, tok, run_dir, seq_len, batch_size, max_tokens, masking)
    splits = [r for r in (run_folder_of(o) for o in other_runs) if r is not None and (r / "config.yaml").is_file()]
    if splits and run_dir is not None and "validation" in ppl:
        ppl[split_key(run_dir)] = ppl["validation"]
    for other_dir in splits:
        if other_dir != run_dir:
            ppl[split_key(other_dir)] = _split_entry(model, tok, other_dir, asked_seq_len, batch_size, max_tokens,
                                                     masking)
    seq_len = min(seq_len or 256, model_max_length(model))
    for src in data:
        r = source_perplexity(model, tok, src, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                              text_field=text_field, document_masking=masking)
        ppl[src] = {**r, "source": src}
    bench = evaluate_tasks(model, tok, list(tasks), limit, batch_size=batch_size, hub=hub,
                           bootstrap_iters=bootstrap_iters) if tasks else {}
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    res = {"model": spec, "created": created, "perplexity": ppl, "tasks": bench, "limit": limit,
           "tasks_from": "hub" if hub else "fixtures", "lm_eval": lm_eval_version(),
           "device": str(next(model.parameters()).device), "torch": torch.__version__,
           "seconds": round(time.perf_counter() - t0, 2)}
    folder = Path(out_dir) if out_dir else output_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    res["path"] = str(path)
    return res


def split_key(run_dir: Path) -> str:
    """The perplexity entry of a run's split when two models meet on it: 'val <run folder name>'."""
    return f"val {run_dir.name}"


def _split_entry(model, tok, run_dir: Path, seq_len, batch_size, max_tokens, masking) -> dict:
    """A run's split scored on `model`, or {"error": why} when it cannot be rebuilt or scored."""
    from ..errors import LmlabError
    from ..eval.perplexity_sources import run_split_score
    from ..fsutil import first_line

    try:
        return run_split_score(model, tok, run_dir, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                               document_masking=masking)
    except (LmlabError, OSError, ValueError) as e:
        return {"error": first_line(e)}


def _metrics(res: dict) -> dict[str, float]:
    """Flat {label: value}: 'ppl <source>', 'pref_acc <source>' (preference pairs) and '<task> <metric>'."""
    out = {}
    for src, r in res.get("perplexity", {}).items():
        if "ppl" in r:
            out[f"ppl {src}"] = r["ppl"]
        if "preference_accuracy" in r:
            out[f"pref_acc {src}"] = r["preference_accuracy"]
    for task, r in res.get("tasks", {}).items():
        for k, v in r.items():
            if k in ("acc", "acc_norm", "perplexity") and isinstance(v, float):
                out[f"{task} {k}"] = v
    return out


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def format_results(res: dict) -> str:
    lines = [f"{res['model']}  ({res['seconds']:.1f} s)"]
    for src, r in res.get("perplexity", {}).items():
        if "error" in r:
            lines.append(f"  ppl   {src:<28} {'—':>12}  not measured: {r['error']}")
            continue
        split = f", {r['split']}" if r.get("split", "text") != "text" else ""
        extra = f"  preference accuracy {r['preference_accuracy']:.3f}" if "preference_accuracy" in r else ""
        lines.append(f"  ppl   {src:<28} {r['ppl']:>12.3f}  loss {r['loss']:.4f}  ({r['tokens']:,} tokens{split})"
                     f"{extra}")
    for task, r in res.get("tasks", {}).items():
        vals = "  ".join(f"{k} {_fmt(r[k])}" for k in ("acc", "acc_norm", "perplexity") if k in r)
        lines.append(f"  task  {task:<28} {vals}  (n={r.get('n')})")
    return "\n".join(lines)


def format_deltas(a: dict, b: dict) -> str:
    """The comparison table: every metric either model has, a dash where one lacks it. Each model's own
    'validation' is left out when the two are different splits (the 'val <run>' rows compare them on each)."""
    ma, mb = _metrics(a), _metrics(b)
    pa, pb = a.get("perplexity", {}), b.get("perplexity", {})
    own_a, own_b = pa.get("validation", {}), pb.get("validation", {})
    if (own_a.get("split"), own_a.get("source")) != (own_b.get("split"), own_b.get("source")):
        ma, mb = ({k: v for k, v in m.items() if not k.endswith(" validation")} for m in (ma, mb))
    lines = [f"delta: {b['model']} − {a['model']}", f"  {'metric':<34} {'first':>12} {'second':>12} {'delta':>12}"]
    for key in list(dict.fromkeys([*ma, *mb])):
        va, vb = ma.get(key), mb.get(key)
        delta = f"{vb - va:>+12.4f}" if va is not None and vb is not None else f"{'—':>12}"
        cells = [_fmt(v) if v is not None else "—" for v in (va, vb)]
        lines.append(f"  {key:<34} {cells[0]:>12} {cells[1]:>12} {delta}")
    for src in dict.fromkeys([*pa, *pb]):  # splits that could not be scored, with the reason
        for which, entry in (("first", pa.get(src, {})), ("second", pb.get(src, {}))):
            if "error" in entry:
                lines.append(f"  ppl {src:<30} {which}: not measured: {entry['error']}")
    return "\n".join(lines)
