"""Benchmarks through lm-eval, on the model already in memory.

    evaluate_tasks(model, tokenizer, ["lambada", "hellaswag", "piqa", "winogrande"], limit=50)
        -> {"lambada": {"acc": 0.31, "perplexity": 412.0, "n": 50, "task": "lambada_openai_local", ...}, ...}

The model is handed to lm-eval's `HFLM` as an object (no path, no remote code), so lmlab's own architectures and
any Hugging Face causal LM are scored the same way; `acc` and `acc_norm` are lm-eval's own (acc_norm divides each
choice's log-likelihood by the choice's length in characters).

Offline (the default) each task runs on a small local file in the task's own schema (`fixtures/*.jsonl`): a task
YAML is written at run time that `include`s lm-eval's stock task by absolute path and points `dataset_path: json`
and `dataset_kwargs.data_files` at the local file, so prompts, targets and metrics stay exactly the stock ones.
With `hub=True` the stock tasks run on their hub datasets (needs the network). Fixture scores test the pipeline and
compare models on the same items; they are not comparable with published numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, LmlabError

log = logging.getLogger(__name__)

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # what lmlab calls it
    stock: str  # lm-eval's task name
    yaml: str  # the stock task's YAML, relative to lm_eval/tasks/
    split: str  # the split the stock task evaluates on
    fixture: str  # local file in the task's own schema
    metrics: tuple[str, ...]  # what lm-eval reports for it


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("lambada", "lambada_openai", "lambada/lambada_openai.yaml", "test", "lambada_openai.jsonl",
             ("acc", "perplexity")),
    TaskSpec("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "validation", "hellaswag.jsonl",
             ("acc", "acc_norm")),
    TaskSpec("piqa", "piqa", "piqa/piqa.yaml", "validation", "piqa.jsonl", ("acc", "acc_norm")),
    TaskSpec("winogrande", "winogrande", "winogrande/default.yaml", "validation", "winogrande.jsonl", ("acc",)),
)}
DEFAULT_TASKS = tuple(TASKS)
_ALIASES = {t.stock: t.name for t in TASKS.values()}


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'lambada,piqa' or a list -> lmlab task names; stock names (lambada_openai) are accepted too."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        name = _ALIASES.get(item, item)
        if name not in TASKS:
            raise ConfigError(f"--tasks: unknown task {item!r}; choose from {', '.join(TASKS)}")
        if name not in names:
            names.append(name)
    return names


def fixture_path(task: str) -> Path:
    return FIXTURES / TASKS[task].fixture


def local_task_name(task: str) -> str:
    return f"{TASKS[task].stock}_local"


def write_task_yamls(folder: Path | str, tasks: list[str], data_files: dict[str, str | Path] | None = None) -> Path:
    """Write one lm-eval task YAML per task into `folder`: the stock task, included by absolute path, run on a
    local JSON-lines file (the shipped fixture, or `data_files[task]`). Returns `folder`."""
    import lm_eval.tasks

    stock_root = Path(lm_eval.tasks.__file__).parent
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        spec = TASKS[task]
        data = Path((data_files or {}).get(task, fixture_path(task))).resolve()
        if not data.is_file():
            raise LmlabError(f"{task}: no data file {data}")
        stock = stock_root / spec.yaml
        if not stock.is_file():
            raise LmlabError(f"lm-eval has no {spec.yaml}; install a version that ships it: pip install 'lmlab[eval]'")
        lines = [
            f"include: {json.dumps(str(stock))}",
            f"task: {local_task_name(task)}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{{spec.split}: {json.dumps(str(data))}}}}}",
        ]
        splits = {"training_split": "null", "validation_split": "null", "test_split": "null"}
        splits[f"{spec.split}_split"] = spec.split
        lines += [f"{k}: {v}" for k, v in splits.items()]
        (folder / f"{local_task_name(task)}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def _task_dir(tasks: list[str], data_files: dict[str, str | Path] | None) -> Path:
    from ..data import cache_dir

    key = json.dumps({t: str(Path((data_files or {}).get(t, fixture_path(t))).resolve()) for t in tasks},
                     sort_keys=True)
    folder = cache_dir() / "eval-tasks" / hashlib.sha256(key.encode()).hexdigest()[:12]
    return write_task_yamls(folder, tasks, data_files)


def model_max_length(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "max_seq_len", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def evaluate_tasks(model, tokenizer, tasks: list[str] | str = DEFAULT_TASKS, limit: int | float | None = None, *,
                   batch_size: int = 8, hub: bool = False, bootstrap_iters: int = 0, num_fewshot: int | None = None,
                   data_files: dict[str, str | Path] | None = None, seed: int = 1234) -> dict[str, dict]:
    """Score `model` (an in-memory causal LM) on lm-eval tasks. Returns {task: {metric: value, "n": items,
    "task": lm-eval task name, "source": "fixture"|"hub"|path, "seconds": ...}} with metrics as lm-eval names them
    (acc, acc_norm, perplexity; *_stderr when bootstrap_iters > 0). The model's train/eval mode is restored."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmlabError("benchmarks need lm-eval: pip install 'lmlab[eval]'") from None
    names = parse_tasks(tasks)
    if not names:
        return {}
    if hub:
        manager = TaskManager()
        lm_names = {t: TASKS[t].stock for t in names}
    else:
        manager = TaskManager(include_path=str(_task_dir(names, data_files)), include_defaults=False)
        lm_names = {t: local_task_name(t) for t in names}
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", device=device, batch_size=batch_size,
              max_length=model_max_length(model))
    t0 = time.perf_counter()
    try:
        with _quiet_git_probe():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(lm_names.values()), limit=limit, task_manager=manager,
                                          bootstrap_iters=bootstrap_iters, num_fewshot=num_fewshot,
                                          log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    results = {}
    for task, lm_name in lm_names.items():
        raw = out["results"][lm_name]
        row: dict = {}
        for key, value in raw.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, int | float):
                row[metric] = float(value)
        n = out.get("n-samples", {}).get(lm_name, {})
        row["n"] = int(n.get("effective", 0)) if n else None
        row["task"] = lm_name
        row["source"] = "hub" if hub else str(Path((data_files or {}).get(task, fixture_path(task))).resolve())
        results[task] = row
    for row in results.values():
        row["seconds"] = round(seconds / len(results), 3)
    return results


def _git_commit() -> str | None:
    """The working directory's git commit as lm-eval records it, or None outside a checkout, with git's stderr
    silenced."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records the working directory's git commit by running `git describe`, whose "fatal: not a git
    repository" would reach the terminal of every evaluation run outside a checkout: the same probe, quiet."""
    import lm_eval.evaluator as evaluator

    real = getattr(evaluator, "get_git_commit_hash", None)
    if real is None:  # a release that records it otherwise
        yield
        return
    evaluator.get_git_commit_hash = _git_commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = real


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None
