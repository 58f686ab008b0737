"""The folder a run exports: an ordinary Hugging Face model folder.

    export(model, tokenizer, "runs/<run>/final")

An exported lmlab architecture (MambaSWELU, INL-LLM) carries two thin modules and an `auto_map` that point
at the installed lmlab, so in any Python where lmlab is installed,
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it without importing lmlab
first (lm-eval's CLI, a notebook, PEFT tools). After `import lmlab` no flag is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

from ..fsutil import atomic_dir
from ..runs import run_of


def export(model, tokenizer, final: Path, *, run_dir: Path | None = None, card: bool = True,
           license: str | None = None) -> Path:
    """Hugging Face format: config.json, model.safetensors, tokenizer files (and, for lmlab's own
    architectures, the `auto_map` modules). Written atomically: `final` is complete or untouched.

    A model with LoRA adapters (a peft PeftModel) is written as a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors, tokenizer), which `PeftModel.from_pretrained(base, folder)` loads; `lmlab export
    RUN --merge` writes the merged model. A tokenizer with a chat template (fine-tuned runs) keeps it, and the
    end-of-turn token joins `generation_config.eos_token_id`, so generation stops at the end of a reply.

    `card`: write README.md from `run_dir` (default: the run folder `final` lies in, if any). A card that cannot
    be written is reported as a warning and left out; the model folder is written either way."""
    hf_logging.disable_progress_bar()
    final = Path(final)
    stop_at_end_of_turn(model, tokenizer)
    with atomic_dir(final, overwrite=True) as tmp:
        with _quiet_deepspeed():  # transformers' unwrap_model imports DeepSpeed where installed; it logs a warning
            model.save_pretrained(tmp, safe_serialization=True, **_adapter_save_options(model))
        tokenizer.save_pretrained(tmp)
        if type(model).__module__.startswith("lmlab."):
            write_auto_map(model, tmp)
        if card:
            write_model_card(model, tmp, run_dir if run_dir is not None else run_of(final.parent),
                             adapter=(tmp / "adapter_config.json").is_file(), license=license)
    return final


@contextlib.contextmanager
def _quiet_deepspeed():
    """Within: DeepSpeed's logger drops everything below ERROR. transformers' unwrap_model imports DeepSpeed
    where it is installed, and its import warns that it found no GPU: noise in every export. A filter (not a
    level: DeepSpeed sets its logger's level when it creates it) on the logger object it will use."""
    log = logging.getLogger("DeepSpeed")
    keep = logging.Filter()
    keep.filter = lambda record: record.levelno >= logging.ERROR
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _adapter_save_options(model) -> dict:
    """A PEFT model whose embeddings grew past its base config's vocabulary (a chat template's special tokens were
    added for the run) saves its embedding layers with the adapter, so the folder carries the new rows; otherwise
    peft's own choice, without its guess about a hub config."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        return {}
    import json

    base = get_base()
    source = Path(getattr(base.config, "_name_or_path", "") or ".") / "config.json"  # the base folder it came from
    try:
        before = json.loads(source.read_text()).get("vocab_size")
    except (OSError, ValueError):
        return {}
    grown = isinstance(before, int) and base.get_input_embeddings().weight.shape[0] > before
    return {"save_embedding_layers": True} if grown else {}


def parameter_counts(model) -> tuple[int, int | None, object]:
    """(exact parameter count, trained adapter parameters or None, the base model) of a model or PeftModel."""
    total = sum(p.numel() for p in model.parameters())
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        return total, None, model
    trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return total, trained, get_base()


def write_model_card(model, folder: Path, run_dir: Path | None, *, adapter: bool = False, kind: str | None = None,
                     gguf_file: str | None = None, license: str | None = None) -> Path | None:
    """README.md (model card) for an exported `folder`; a failure is one warning line, never a failed export."""
    from ..fsutil import first_line

    try:
        from ..ship.card import write_card

        total, trained, base = parameter_counts(model)
        return write_card(Path(folder), run_dir=run_dir, kind=kind or ("adapter" if adapter else "model"),
                          parameters=total, trainable=trained, architecture=type(base).__name__,
                          model_type=getattr(base.config, "model_type", None), gguf_file=gguf_file, license=license)
    except Exception as e:  # noqa: BLE001 - the card describes the model; it never costs the model itself
        warnings.warn(f"model card not written for {folder}: {first_line(e)}", stacklevel=2)
        return None


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Add the chat template's end-of-turn token to the model's generation eos ids (no-op without a template)."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(tokenizer, "chat_template", None):
        return
    from ..data.chat import ChatFormat
    from ..errors import LmlabError

    try:
        eot = ChatFormat(tokenizer, "tokenizer").end_of_turn_id
    except LmlabError:
        return  # a template lmlab cannot probe: leave generation as it is
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = sorted({e for e in [*eos, eot, tokenizer.eos_token_id] if e is not None})


def write_auto_map(model, folder: Path) -> None:
    """Thin `configuration_lmlab.py` / `modeling_lmlab.py` re-exporting the installed lmlab classes, named by
    `auto_map` in config.json, so transformers finds the classes without lmlab being imported first."""
    cfg_cls, model_cls = type(model.config), type(model)
    header = '"""Loads this model\'s classes from the installed lmlab package (pip install lmlab)."""\n\n'
    (folder / "configuration_lmlab.py").write_text(
        f"{header}from {cfg_cls.__module__} import {cfg_cls.__name__}  # noqa: F401\n")
    (folder / "modeling_lmlab.py").write_text(
        f"{header}from {model_cls.__module__} import {model_cls.__name__}  # noqa: F401\n")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoConfig": f"configuration_lmlab.{cfg_cls.__name__}",
                          "AutoModelForCausalLM": f"modeling_lmlab.{model_cls.__name__}"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
