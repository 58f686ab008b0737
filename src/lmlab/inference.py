"""Models for inference:

    model, tokenizer = load_for_inference("runs/<run>")    a run (final/, else its latest checkpoint),
                                                           a multi-stage run (its last finished stage),
                                                           a model folder, or a hub id
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from .config import load_config
from .data.tokenizer import load_tokenizer
from .errors import LmlabError
from .models.hf import load_model
from .runtime import pick_device
from .train import checkpoint as ckpt
from .train.setup import build_model


def _adapter_run(run: Path) -> bool:
    try:
        return load_config(run / "config.yaml").finetune.method != "full"
    except (OSError, LmlabError):
        return False


def load_for_inference(spec: str, device: str = "auto"):
    """(model, tokenizer) from a run folder, a model folder or a hub id."""
    from .runs import resolve_stage

    dev = pick_device(device)
    path = resolve_stage(spec)
    if (path / "run.json").is_file() or (path / "config.yaml").is_file():  # a run folder
        if (path / "final" / "config.json").is_file():
            path = path / "final"
        elif (path / "final" / "adapter_config.json").is_file() or _adapter_run(path):
            from .train.adapters import load_run_model  # base + LoRA adapters (needs lmlab[finetune])

            model, tok = load_run_model(path)
            return model.to(dev).eval(), tok
        else:
            latest = ckpt.latest_checkpoint(path / "checkpoints")
            if latest is None:
                raise LmlabError(f"{spec}: run has neither final/ nor a complete checkpoint yet")
            if (latest / "dcp").is_dir():
                raise LmlabError(f"{spec}: its latest checkpoint is sharded (train.strategy=fsdp) and the run has no "
                                 f"final/ yet; let it finish, or resume it to export")
            cfg = load_config(path / "config.yaml")
            tok = load_tokenizer(str(path / "tokenizer"))
            model = build_model(cfg, tok)
            ckpt.load_checkpoint(latest, model)
            return model.to(dev).eval(), tok
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmlabError(f"{spec}: no config.json (not a model folder or run folder)")
        hf_logging.disable_progress_bar()  # what the caller prints is the output
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(dev).eval(), load_tokenizer(str(path))
    model = load_model(spec)
    return model.to(dev).eval(), load_tokenizer(spec)
