"""lmlab compare: the same prompts through two models (a base and its fine-tune), answers side by side.

    lmlab compare runs/base runs/chat-sft
    lmlab compare runs/base runs/chat-sft --prompts prompts.jsonl     {"prompt": ..., "reference": ...} per line

Each model answers in its own chat format (a fine-tuned export carries its template; a base model gets the plain
`User:` / `Assistant:` format), greedily by default so two invocations print the same thing. A prompts file is
text (one prompt per line, `#` comments) or JSON/JSONL objects with `prompt` and an optional `reference` answer;
a reference is scored under each model by its loss per token (mean negative log-likelihood of the reference
tokens after the prompt, in nats): lower means the model finds that answer more likely. Models with different
tokenizers split the same reference into different tokens, so compare their losses with that in mind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._common import add_device_flag, add_sampling_flags, sampling_config
from .chat import respond

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "What is 2+2?",
    "Hello! How are you today?",
    "Write a haiku about the sea.",
    "What is machine learning?",
    "Write a Python function that returns the reverse of a string.",
]


def add_arguments(p) -> None:
    p.add_argument("base", help="the first model: run folder, model folder or hub id")
    p.add_argument("tuned", help="the second model (e.g. the fine-tuned run)")
    p.add_argument("--prompts", help="prompts file: text (one per line) or JSON/JSONL with prompt [+ reference]")
    p.add_argument("--system", help="system prompt given to both models")
    p.add_argument("--labels", nargs=2, metavar=("BASE", "TUNED"), default=("base", "tuned"),
                   help="column names (default: base tuned)")
    add_sampling_flags(p, max_new_tokens=64, temperature=0.0)
    add_device_flag(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")


def read_prompts(path: str | None) -> list[dict]:
    """[{"prompt": str, "reference": str | None}] from a prompts file, or the default prompts."""
    from ..errors import DataError

    if path is None:
        return [{"prompt": p, "reference": None} for p in DEFAULT_PROMPTS]
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts: {path} not found")
    text = p.read_text(encoding="utf-8")
    rows: list = []
    if p.suffix in (".json", ".jsonl"):
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except ValueError:
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise DataError(f"{path}:{i}: not valid JSON") from None
    else:
        rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = []
    for i, r in enumerate(rows, 1):
        if isinstance(r, str):
            out.append({"prompt": r, "reference": None})
        elif isinstance(r, dict) and isinstance(r.get("prompt"), str) and r["prompt"].strip():
            ref = r.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise DataError(f"{path}: item {i}: reference must be a string")
            out.append({"prompt": r["prompt"], "reference": ref})
        else:
            raise DataError(f"{path}: item {i}: expected a string or an object with a 'prompt' string")
    if not out:
        raise DataError(f"--prompts: {path} holds no prompt")
    return out


def reference_loss(model, fmt, messages: list[dict], reference: str) -> float:
    """Mean negative log-likelihood per token (nats) of `reference` as the assistant's reply to `messages`."""
    import torch
    import torch.nn.functional as F

    from ..data.chat import IGNORE

    enc = fmt.encode([*messages, {"role": "assistant", "content": reference}])
    ids = torch.tensor([enc.input_ids], device=next(model.parameters()).device)
    labels = torch.tensor([enc.labels], device=ids.device)
    with torch.inference_mode():
        logits = model(ids).logits.float()  # (1, l, V)
    logp = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    n = int((labels[0, 1:] != IGNORE).sum())
    return float(logp) / max(n, 1)


def answer_all(spec: str, prompts: list[dict], sampling, *, system: str | None, device: str, seed: int) -> list[dict]:
    """Each prompt's answer (and reference loss) from the model at `spec`, loaded once."""
    import torch

    from ..data.chat import ChatFormat
    from ..inference import load_for_inference

    model, tok = load_for_inference(spec, device)
    fmt = ChatFormat(tok, "auto")
    out = []
    for item in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": item["prompt"]}]
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        answer = respond(model, tok, fmt, msgs, sampling, generator=gen)
        loss = reference_loss(model, fmt, msgs, item["reference"]) if item.get("reference") else None
        out.append({"answer": answer, "reference_loss": loss, "template": fmt.name})
    del model
    return out


def compare(base: str, tuned: str, prompts: list[dict], sampling, *, system: str | None = None,
            device: str = "auto", seed: int = 0) -> list[dict]:
    """[{prompt, reference, base, tuned, base_loss, tuned_loss}] for every prompt."""
    a = answer_all(base, prompts, sampling, system=system, device=device, seed=seed)
    b = answer_all(tuned, prompts, sampling, system=system, device=device, seed=seed)
    return [{"prompt": p["prompt"], "reference": p.get("reference"), "base": x["answer"], "tuned": y["answer"],
             "base_loss": x["reference_loss"], "tuned_loss": y["reference_loss"]}
            for p, x, y in zip(prompts, a, b)]


def _one_line(s: str) -> str:
    from .chat import one_line

    return one_line(s) if s else "(empty)"


def render_text(rows: list[dict], labels: tuple[str, str]) -> str:
    """Plain text for pipes and files: one block per prompt."""
    w = max(len(labels[0]), len(labels[1]))
    lines = []
    for r in rows:
        lines.append(f"### {r['prompt']}")
        lines.append(f"{labels[0]:<{w}} : {_one_line(r['base'])}")
        lines.append(f"{labels[1]:<{w}} : {_one_line(r['tuned'])}")
        if r["reference"]:
            lines.append(f"{'reference':<{w}} : {_one_line(r['reference'])}")
            lines.append(f"loss per reference token: {labels[0]} {r['base_loss']:.3f}, {labels[1]} "
                         f"{r['tuned_loss']:.3f}")
        lines.append("")
    scored = [r for r in rows if r["reference"]]
    if scored:
        lines.append(_summary(scored, labels))
    return "\n".join(lines).rstrip() + "\n"


def _summary(scored: list[dict], labels: tuple[str, str]) -> str:
    mb = sum(r["base_loss"] for r in scored) / len(scored)
    mt = sum(r["tuned_loss"] for r in scored) / len(scored)
    wins = sum(r["tuned_loss"] < r["base_loss"] for r in scored)
    return (f"reference loss (mean over {len(scored)}): {labels[0]} {mb:.3f}, {labels[1]} {mt:.3f}; "
            f"{labels[1]} lower on {wins}/{len(scored)}")


def render_table(rows: list[dict], labels: tuple[str, str], out) -> None:
    from rich.table import Table

    table = Table(title=f"lmlab compare: {labels[0]} vs {labels[1]}", title_justify="left", show_lines=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column(labels[0], ratio=2, overflow="fold")
    table.add_column(labels[1], ratio=2, overflow="fold")
    scored = any(r["reference"] for r in rows)
    if scored:
        table.add_column("ref loss", justify="right")
    for r in rows:
        cells = [r["prompt"], r["base"] or "[dim](empty)[/]", r["tuned"] or "[dim](empty)[/]"]
        if scored:
            cells.append(f"{r['base_loss']:.2f} → {r['tuned_loss']:.2f}" if r["reference"] else "")
        table.add_row(*cells)
    out.print(table)
    if scored:
        out.print(_summary([r for r in rows if r["reference"]], labels))


def run(args) -> int:
    prompts = read_prompts(args.prompts)
    sampling = sampling_config(args)
    rows = compare(args.base, args.tuned, prompts, sampling, system=args.system, device=args.device, seed=args.seed)
    labels = tuple(args.labels)
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    elif sys.stdout.isatty():
        from rich.console import Console

        render_table(rows, labels, Console())
    else:
        sys.stdout.write(render_text(rows, labels))
    return 0
