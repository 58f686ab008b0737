"""lmlab eval: perplexity per text source and benchmark tasks (lm-eval) for a run or any causal LM.

    lmlab eval runs/r1                                  validation perplexity + the four tasks on local fixtures
    lmlab eval runs/r1 --data notes/ hf:wikitext@test   ... plus perplexity on other sources, one line each
    lmlab eval runs/base runs/tuned --limit 50          both, then the deltas (second − first)

Results go to <run>/eval/<name>.json (a model folder: <folder>/eval/; a hub id: ./eval/<id>/), and are printed.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

HELP = "perplexity per data source and benchmarks (lm-eval) of a run or model; two models: print deltas"


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
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: the run's data.seq_len, "
                   "else 256)")
    p.add_argument("--max-tokens", type=int, default=262_144, help="tokens scored per source (0 = all)")
    p.add_argument("--text-field", default="text", help="text field of jsonl/parquet sources")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap-iters", type=int, default=0, help="lm-eval stderr bootstrap (0 = off)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
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
        res = evaluate_model(spec, data=args.data, tasks=tasks, limit=args.limit, hub=args.hub,
                             val=not args.no_val, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                             text_field=args.text_field, batch_size=args.batch_size,
                             bootstrap_iters=args.bootstrap_iters, device=args.device, name=args.name)
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
    """The run folder `spec` belongs to (a run folder itself, or its final/), else None."""
    path = Path(spec)
    for cand in (path, path.parent):
        if (cand / "run.json").is_file() or (cand / "config.yaml").is_file():
            if cand == path or path.name == "final":
                return cand
    return None


def output_dir(spec: str) -> Path:
    run_dir = run_folder_of(spec)
    if run_dir is not None:
        return run_dir / "eval"
    if Path(spec).is_dir():
        return Path(spec) / "eval"
    return Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def evaluate_model(spec: str, *, data=(), tasks=(), limit=None, hub=False, val=True, seq_len=None,
                   max_tokens=262_144, text_field="text", batch_size=8, bootstrap_iters=0, device="auto",
                   name=None, out_dir: Path | None = None) -> dict:
    """Evaluate one model and write its results JSON. Returns the results (with "path")."""
    import torch

    from ..eval.harness import evaluate_tasks, lm_eval_version, model_max_length
    from ..eval.perplexity_sources import run_validation_tokens, source_perplexity, token_perplexity
    from ..inference import load_for_inference

    t0 = time.perf_counter()
    model, tok = load_for_inference(spec, device)
    run_dir = run_folder_of(spec)
    ppl: dict[str, dict] = {}
    masking = False
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from ..config import load_config

        cfg = load_config(run_dir / "config.yaml")
        seq_len = seq_len or cfg.data.seq_len
        masking = cfg.data.document_masking and getattr(model, "supports_packed_documents", False)
        if val:
            tokens, info = run_validation_tokens(run_dir, tok)
            r = token_perplexity(model, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                 eos_id=tok.eos_token_id, document_masking=masking)
            ppl["validation"] = {**r, "source": info["source"], "matches_run": info["matches_run"]}
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


def _metrics(res: dict) -> dict[str, float]:
    """Flat {label: value}: 'ppl <source>' and '<task> <metric>'."""
    out = {}
    for src, r in res.get("perplexity", {}).items():
        out[f"ppl {src}"] = r["ppl"]
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
        lines.append(f"  ppl   {src:<28} {r['ppl']:>12.3f}  loss {r['loss']:.4f}  ({r['tokens']:,} tokens)")
    for task, r in res.get("tasks", {}).items():
        vals = "  ".join(f"{k} {_fmt(r[k])}" for k in ("acc", "acc_norm", "perplexity") if k in r)
        lines.append(f"  task  {task:<28} {vals}  (n={r.get('n')})")
    return "\n".join(lines)


def format_deltas(a: dict, b: dict) -> str:
    ma, mb = _metrics(a), _metrics(b)
    lines = [f"delta: {b['model']} − {a['model']}", f"  {'metric':<34} {'first':>12} {'second':>12} {'delta':>12}"]
    for key in [k for k in ma if k in mb]:
        lines.append(f"  {key:<34} {_fmt(ma[key]):>12} {_fmt(mb[key]):>12} {mb[key] - ma[key]:>+12.4f}")
    return "\n".join(lines)
