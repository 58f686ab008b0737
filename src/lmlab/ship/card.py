"""Model cards: the README.md every export writes, in the Hugging Face model-card format.

    write_card(folder, run_dir=..., kind="model" | "adapter" | "gguf", parameters=...)   -> folder/README.md

YAML metadata first (`library_name`, `pipeline_tag`, `base_model` for a fine-tuned run whose base is a hub id,
`datasets` for hub sources, `license`, `tags`, and `model-index` with the results `lmlab eval` wrote to
`<run>/eval/*.json`: the newest value of each metric wins, so an edited or repeated evaluation shows after
the next export), then the run's facts: architecture and exact parameter count, tokens seen and tokens per
parameter, data sources, hardware, wall time, final losses, a loss curve (`loss.png`, when matplotlib is
installed), the fine-tuning method and chat template, how to load the folder with and without lmlab, and limits.

Everything is read from the run folder (run.json, config.yaml, metrics.jsonl through `monitor.runread`), so
a card can be written again at any time; the metadata is built with huggingface_hub's `ModelCardData` and
the result parsed back by `ModelCard` before it is written.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..errors import LmlabError

LOSS_IMAGE = "loss.png"
FAMILY_TAGS = {"llama": "llama", "mamba_swelu": "mamba-swelu", "inl_llm": "inl-llm"}


# ------------------------------------------------------------------------------------------------ facts
def run_facts(run_dir: Path | None) -> dict[str, Any]:
    """What a card says about a run, read from its folder ({} for None): manifest, config, the last losses,
    tokens, wall time, the loss series and the merged evaluation results."""
    if run_dir is None:
        return {}
    from ..monitor.runread import RunReader

    reader = RunReader(run_dir)
    state = reader.refresh()
    m = reader.manifest
    summary = m.get("summary") or {}
    tokens = summary.get("tokens") if summary.get("tokens") is not None else state.tokens
    return {
        "name": Path(run_dir).name, "manifest": m, "config": reader.config, "status": state.status,
        "model": m.get("model") or state.model, "objective": m.get("objective"),
        "tokens": tokens, "step": summary.get("step") or state.step, "elapsed_s": state.elapsed_s,
        "loss": state.loss, "loss_smooth": state.loss_smooth,
        "val_loss": summary.get("val_loss") if summary.get("val_loss") is not None else state.val_loss,
        "train_series": reader.series("train", "loss"), "val_series": reader.series("eval", "val_loss"),
        "system": reader.system[-1] if reader.system else {},
        "evals": eval_results(Path(run_dir) / "eval"),
    }


def eval_results(folder: Path) -> dict[tuple[str, str], dict]:
    """{(source or task, metric): {"value", "kind", "created", "file", ...}} from `lmlab eval`'s JSON files in
    `folder`, oldest file first so the newest value of each metric wins."""
    files = []
    for path in Path(folder).glob("*.json"):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(res, dict):
            files.append((str(res.get("created") or ""), path.stat().st_mtime, path, res))
    out: dict[tuple[str, str], dict] = {}
    for created, _, path, res in sorted(files, key=lambda f: (f[0], f[1])):
        for src, r in (res.get("perplexity") or {}).items():
            if isinstance(r, dict) and _finite(r.get("ppl")):
                out[(src, "perplexity")] = {"value": float(r["ppl"]), "kind": "ppl", "tokens": r.get("tokens"),
                                            "created": created, "file": path.name, "source": r.get("source", src)}
        for task, r in (res.get("tasks") or {}).items():
            if not isinstance(r, dict):
                continue
            for metric in ("acc", "acc_norm", "perplexity"):
                if _finite(r.get(metric)):
                    out[(task, metric)] = {"value": float(r[metric]), "kind": "task", "n": r.get("n"),
                                           "created": created, "file": path.name,
                                           "tasks_from": res.get("tasks_from", "fixtures")}
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sources(config: dict) -> list[str]:
    src = (config.get("data") or {}).get("source")
    return [str(s) for s in src] if isinstance(src, list) else [str(src)] if src else []


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hugging Face hub id (org/name, not a path here and not an lmlab size)."""
    from .. import hub

    if not name or "/" not in name or not hub.is_hub_id(name):
        return None
    return name


def base_model(facts: dict) -> str | None:
    """The model a fine-tuned run started from (config model.name), None for pretraining from scratch."""
    cfg = facts.get("config") or {}
    name = (cfg.get("model") or {}).get("name")
    objective = (cfg.get("train") or {}).get("objective") or facts.get("objective") or "pretrain"
    method = (cfg.get("finetune") or {}).get("method") or "full"
    if objective == "pretrain" and method == "full":
        from ..models.registry import named_sizes

        if name in named_sizes():
            return None
    return name


# ------------------------------------------------------------------------------------------------ the card
def build_card(*, run_dir: Path | None, kind: str = "model", parameters: int | None = None,
               architecture: str | None = None, model_type: str | None = None, gguf_file: str | None = None,
               license: str | None = None, image: bool = False, trainable: int | None = None):
    """The card as a huggingface_hub ModelCard (parsed back from its text)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if kind not in ("model", "adapter", "gguf"):
        raise LmlabError(f"card kind {kind!r}: one of model, adapter, gguf")
    facts = run_facts(run_dir)
    cfg = facts.get("config") or {}
    name = facts.get("name") or "model"
    base = base_model(facts)
    hub_base = _hub_id(base)
    datasets = [s[3:] for s in _sources(cfg) if s.startswith("hf:")]
    family = FAMILY_TAGS.get(model_type or "", model_type)
    tags = ["lmlab", "text-generation"] + ([family] if family else [])
    tags += {"adapter": ["peft", "lora"], "gguf": ["gguf", "llama.cpp"]}.get(kind, [])
    method = (cfg.get("finetune") or {}).get("method")
    if method in ("lora", "qlora") and "lora" not in tags:
        tags.append(method)
    evals = [_eval_result(EvalResult, key, r, name) for key, r in facts.get("evals", {}).items()]
    data = ModelCardData(
        library_name={"model": "transformers", "adapter": "peft", "gguf": "gguf"}[kind],
        pipeline_tag="text-generation", base_model=hub_base, datasets=datasets or None,
        license=license or "other", license_name=None if license else "unspecified", tags=tags,
        model_name=name, eval_results=evals or None)
    body = _body(facts, kind=kind, name=name, base=base, parameters=parameters, architecture=architecture,
                 model_type=model_type, gguf_file=gguf_file, license=license, image=image, trainable=trainable)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return card


def write_card(folder: Path, **kwargs) -> Path:
    """Write README.md (and loss.png when matplotlib is installed and the run logged losses) into `folder`."""
    folder = Path(folder)
    facts_dir = kwargs.get("run_dir")
    image = bool(facts_dir) and write_loss_plot(Path(facts_dir), folder / LOSS_IMAGE)
    card = build_card(image=image, **kwargs)
    path = folder / "README.md"
    path.write_text(str(card) if str(card).endswith("\n") else f"{card}\n", encoding="utf-8")
    return path


def _eval_result(EvalResult, key: tuple[str, str], r: dict, name: str):
    what, metric = key
    if r["kind"] == "ppl":
        src = str(r.get("source") or what)
        dataset = src[3:] if src.startswith("hf:") else f"{name}/{what}" if what == "validation" else src
        label = f"{what} ({r['tokens']:,} tokens)" if isinstance(r.get("tokens"), int) else what
        return EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=label,
                          metric_type="perplexity", metric_value=round(r["value"], 4), metric_name="perplexity")
    where = "local fixture" if r.get("tasks_from") == "fixtures" else "hub"
    n = f", n={r['n']}" if r.get("n") else ""
    return EvalResult(task_type="text-generation", dataset_type=what, dataset_name=f"{what} ({where}{n})",
                      metric_type=metric, metric_value=round(r["value"], 4), metric_name=metric)


def _num(v, fmt: str = ",") -> str:
    return "—" if v is None else format(v, fmt)


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d} min"


def _body(facts: dict, *, kind: str, name: str, base: str | None, parameters: int | None, architecture: str | None,
          model_type: str | None, gguf_file: str | None, license: str | None, image: bool,
          trainable: int | None) -> str:
    cfg = facts.get("config") or {}
    m = facts.get("manifest") or {}
    train, ft, data = cfg.get("train") or {}, cfg.get("finetune") or {}, cfg.get("data") or {}
    objective = train.get("objective") or facts.get("objective") or "pretrain"
    method = ft.get("method") or "full"
    tokens = facts.get("tokens")
    params = parameters if parameters is not None else m.get("parameters")
    ratio = f"{tokens / params:.2f}" if tokens and params else "—"
    lines = [f"# {name}", ""]
    what = "a GGUF file for llama.cpp" if kind == "gguf" else "a PEFT LoRA adapter" if kind == "adapter" else (
        "a Hugging Face model folder")
    how = f"({objective}{', ' + method if method != 'full' else ''})"
    if base:
        lines += [f"A model fine-tuned from `{base}` with [lmlab](https://pypi.org/project/lmlab/) {how}, "
                  f"shipped as {what}.", ""]
    else:
        lines += [f"A {facts.get('model') or architecture or 'language'} model trained with "
                  f"[lmlab](https://pypi.org/project/lmlab/) {how}, shipped as {what}.", ""]
    if not facts:
        lines += ["This folder was exported without its run folder, so the training facts are unknown.", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | {architecture or '—'} (`{model_type or '—'}`) |",
              f"| parameters | {_num(params)} (exact count of the exported weights) |"]
    if trainable is not None:
        lines.append(f"| trained parameters | {_num(trainable)} (the adapters) |")
    if gguf_file:
        lines.append(f"| file | `{gguf_file}` |")
    lines += [f"| context | {data.get('seq_len', '—')} tokens in training |",
              f"| tokenizer | `{data.get('tokenizer', '—')}` |", ""]
    if facts:
        sys_rec = facts.get("system") or {}
        gpus = sys_rec.get("gpus") or []
        gpu_names = sorted({str(g.get("name")) for g in gpus if isinstance(g, dict) and g.get("name")})
        hardware = f"{m.get('device', '—')}" + (f" ({', '.join(gpu_names)})" if gpu_names else "") + (
            f", {m.get('world_size')} process(es)" if m.get("world_size") else "")
        if sys_rec.get("cpu_count"):
            hardware += f", {sys_rec['cpu_count']} CPU cores"
        val = facts.get("val_loss")
        lines += ["## Training", "", "| | |", "|---|---|",
                  f"| objective | {objective} |", f"| method | {method} |",
                  f"| steps | {_num(facts.get('step'))} |",
                  f"| tokens seen | {_num(tokens)} |", f"| tokens / parameter | {ratio} |",
                  f"| data | {', '.join(f'`{s}`' for s in _sources(cfg)) or '—'} |",
                  f"| hardware | {hardware} |", f"| wall time | {_duration(facts.get('elapsed_s'))} |",
                  f"| final training loss | {_num(facts.get('loss'), '.4f')} (smoothed "
                  f"{_num(facts.get('loss_smooth'), '.4f')}) |",
                  f"| final validation loss | {_num(val, '.4f')}"
                  + (f" (perplexity {math.exp(min(val, 50)):,.2f})" if val is not None else "") + " |",
                  *([f"| status | {facts['status']} |"] if facts.get("status") not in (None, "running") else []),
                  ""]
        if method != "full" or objective != "pretrain":
            lines += [f"Fine-tuning: {objective}, method {method}"
                      + (f" (rank {ft.get('lora_rank')}, alpha {ft.get('lora_alpha')}, targets "
                         f"{', '.join(ft.get('lora_targets') or []) or 'the family default'})"
                         if method in ('lora', 'qlora') else "")
                      + f", chat template `{ft.get('template', 'auto')}`, loss on {ft.get('train_on', '—')}"
                      + (f", from `{base}`" if base else "") + ".", ""]
        if image:
            lines += [f"![training and validation loss]({LOSS_IMAGE})", ""]
        else:
            lines += ["(No loss curve: matplotlib is not installed, or the run logged no losses; "
                      "`pip install 'lmlab[plot]'` and export again.)", ""]
    lines += _eval_table(facts.get("evals") or {}, kind)
    lines += _how_to_load(kind, gguf_file, model_type, base)
    lines += ["## Limits", ""]
    if tokens and params:
        lines.append(f"Trained on {_num(tokens)} tokens, {ratio} tokens per parameter"
                     + (" (compute-optimal pretraining is about 20)"
                        if tokens / params < 20 and objective == "pretrain" else "") + ".")
    lines += ["A small research model: it continues text in the style of its training data, can be wrong or repeat "
              "itself, and was not tuned or evaluated for safety. Use it for experiments, not for decisions."]
    if kind == "gguf":
        lines.append("The GGUF file holds the same weights (rounded to its dtype) and tokenizer; llama.cpp's sampling "
                     "defaults differ from transformers'.")
    lines += ["", f"License: {license or 'not chosen (pass `--license` to `lmlab export`)'}.",
              "", f"Card written by lmlab on {time.strftime('%Y-%m-%d')} from the run folder.", ""]
    return "\n".join(lines)


def _eval_table(evals: dict, kind: str = "model") -> list[str]:
    if not evals:
        return ["## Evaluation", "", "No results yet: `lmlab eval RUN` writes them; the next export shows them.", ""]
    measured = " of the model before GGUF conversion" if kind == "gguf" else ""
    lines = ["## Evaluation", "", f"From `lmlab eval`{measured} (newest value of each metric):", "",
             "| what | metric | value | notes |", "|---|---|---|---|"]
    for (what, metric), r in evals.items():
        note = (f"{r['tokens']:,} tokens" if r["kind"] == "ppl" and isinstance(r.get("tokens"), int) else
                f"{'lmlab local fixture' if r.get('tasks_from') == 'fixtures' else 'hub'}"
                + (f", n={r['n']}" if r.get("n") else ""))
        lines.append(f"| {what} | {metric} | {r['value']:.4f} | {note}, {r['created']} |")
    return lines + [""]


def _how_to_load(kind: str, gguf_file: str | None, model_type: str | None, base: str | None) -> list[str]:
    repo = "ORG/NAME"
    own = model_type in ("mamba_swelu", "inl_llm")
    lines = ["## How to load it", "", "With lmlab (`pip install lmlab`):", "", "```bash",
             "lmlab generate FOLDER -p 'def '      # or: lmlab chat FOLDER, lmlab eval FOLDER", "```", ""]
    if kind == "gguf":
        return ["## How to load it", "", "With llama.cpp or llama-cpp-python:", "", "```bash",
                f"llama-cli -m {gguf_file} -p 'def ' -n 64", "```", "", "```python",
                "from llama_cpp import Llama", f"llm = Llama(model_path='{gguf_file}')",
                "print(llm('def ', max_tokens=64)['choices'][0]['text'])", "```", ""]
    if kind == "adapter":
        lines += ["Without lmlab (transformers + peft):", "", "```python",
                  "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  f"model = AutoPeftModelForCausalLM.from_pretrained('{repo}')"
                  + ("  # the base is lmlab's: pip install lmlab" if own else ""),
                  f"tok = AutoTokenizer.from_pretrained('{repo}')", "```",
                  "", f"The base model is `{base or 'the one named in adapter_config.json'}`; "
                  "`lmlab export RUN --merge` writes a merged model instead.", ""]
        return lines
    lines += ["Without lmlab (transformers):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained('{repo}'"
              + (", trust_remote_code=True)  # lmlab's architecture: pip install lmlab" if own else ")"),
              f"tok = AutoTokenizer.from_pretrained('{repo}')",
              "out = model.generate(**tok('def ', return_tensors='pt'), max_new_tokens=64)",
              "print(tok.decode(out[0]))", "```", ""]
    return lines


# ------------------------------------------------------------------------------------------------ the plot
def write_loss_plot(run_dir: Path, out: Path) -> bool:
    """Training (and validation) loss against the step, as a PNG; False when matplotlib is missing or the
    run logged no losses."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from ..monitor.runread import RunReader

    reader = RunReader(run_dir)
    reader.refresh()
    steps, loss = reader.series("train", "loss")
    vsteps, vloss = reader.series("eval", "val_loss")
    if not loss and not vloss:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        if loss:
            ax.plot(steps, loss, lw=1, alpha=0.5, label="train")
            smooth = [math.nan if v is None else v for v in reader.loss_smooth]
            if len(smooth) == len(steps):
                ax.plot(steps, smooth, lw=1.5, label="train (EMA)")
        if vloss:
            ax.plot(vsteps, vloss, "o-", ms=3, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(Path(run_dir).name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return True
