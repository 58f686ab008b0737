"""The folder a run exports: an ordinary Hugging Face model folder.

    export(model, tokenizer, "runs/<run>/final")

An exported lmlab architecture (MambaSWELU, INL-LLM) carries two thin modules and an `auto_map` that point
at the installed lmlab, so in any Python where lmlab is installed,
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it without importing lmlab
first (lm-eval's CLI, a notebook, PEFT tools). After `import lmlab` no flag is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils import logging as hf_logging

from ..fsutil import atomic_dir


def export(model, tokenizer, final: Path) -> Path:
    """Hugging Face format: config.json, model.safetensors, tokenizer files (and, for lmlab's own
    architectures, the `auto_map` modules). Written atomically: `final` is complete or untouched.

    A model with LoRA adapters (a peft PeftModel) is written as a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors, tokenizer), which `PeftModel.from_pretrained(base, folder)` loads; `lmlab export
    RUN --merge` writes the merged model. A tokenizer with a chat template (fine-tuned runs) keeps it, and the
    end-of-turn token joins `generation_config.eos_token_id`, so generation stops at the end of a reply."""
    hf_logging.disable_progress_bar()
    final = Path(final)
    stop_at_end_of_turn(model, tokenizer)
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if type(model).__module__.startswith("lmlab."):
            write_auto_map(model, tmp)
    return final


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
