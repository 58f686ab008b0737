"""Models from run folders: the one loader behind inference, evaluation, chat, serving, export and further tuning.

    model, tok = load_for_inference(spec, device)   a run folder, a multi-stage run (its last finished stage), a
                                                    model folder or a hub id; in eval mode on `device`
    model, tok = load_run_model(run, merge=False)   a run folder: final/ (a model, or a base + its LoRA adapters),
                                                    else its latest complete checkpoint: the whole model
                                                    (model.safetensors), LoRA/QLoRA adapters on the unquantised
                                                    base, or a sharded one (train.strategy=fsdp: dcp/)
    name = resolve_base(spec)                       a run folder as a model folder to fine-tune (model.name)
    model = build_model(cfg, tokenizer)             the model a config describes, before any trained weights:
                                                    what the trainer trains and what a checkpoint loads into

A checkpoint gives the loader its weights only (verified against its manifest); the optimizer, RNG and data
position are the trainer's (`lmlab.train.checkpoint.load_checkpoint`). With `merge`, adapters are folded into
the base (`merge_and_unload`): a plain model whose logits equal base + adapters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, load_config
from ..data.chat import TEMPLATES
from ..data.tokenizer import load_tokenizer
from ..errors import ConfigError, LmlabError
from ..models import registry
from ..models.hf import load_model
from ..train import checkpoint as ckpt
from ..train.adapters import add_adapters, quiet_loading
from . import CHECKPOINTS, is_run, latest_checkpoint, resolve_stage

TEMPLATE_TOKENS = {tok for t in TEMPLATES.values() for tok in t.special}  # what a base may grow by


# ---------------------------------------------------------------------------------- the model a config describes
def build_model(cfg: Config, tokenizer) -> torch.nn.Module:
    """A fresh lmlab model sized to the tokenizer, or a pretrained HF model (folder or hub id; a run folder stands
    for its trained model, `resolve_base`)."""
    kind = registry.describe_kind(cfg.model.name)
    vocab = len(tokenizer)
    if kind == "named":
        mcfg = registry.build_config(cfg.model.name, vocab_size=vocab, overrides=cfg.model.overrides)
        for attr, tok_attr in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id")):
            if hasattr(mcfg, attr) and getattr(tokenizer, tok_attr, None) is not None:
                setattr(mcfg, attr, getattr(tokenizer, tok_attr))
        torch.manual_seed(cfg.train.seed)
        return registry.build_model(mcfg)
    name = resolve_base(cfg.model.name) if kind == "local" else cfg.model.name
    with quiet_loading():
        model = load_model(name, trust_remote_code=cfg.model.trust_remote_code)
    n_emb = model.get_input_embeddings().weight.shape[0]
    if vocab > n_emb:
        extra = set(tokenizer.convert_ids_to_tokens(list(range(n_emb, vocab))))
        if not extra <= TEMPLATE_TOKENS:
            raise ConfigError(f"data.tokenizer: {vocab} tokens but {cfg.model.name} has only {n_emb} embeddings; "
                              f"use the model's own tokenizer (data.tokenizer={cfg.model.name})")
        grow_embeddings(model, vocab)  # a chat template's special tokens (lmlab.data.examples.chat_format)
    return model


def grow_embeddings(model: torch.nn.Module, n: int) -> None:
    """Resize the input embeddings (and an untied output head) to `n` rows; every new row is the mean of the
    existing rows, so a new token starts as an average one and the same base always grows the same way."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    untied = out is not None and out.weight is not inp.weight
    old = inp.weight.shape[0]
    with torch.no_grad():
        means = [inp.weight.mean(0)] + ([out.weight.mean(0)] if untied else [])
    model.resize_token_embeddings(n, mean_resizing=False)
    layers = [model.get_input_embeddings()] + ([model.get_output_embeddings()] if untied else [])
    with torch.no_grad():
        for layer, mean in zip(layers, means):
            layer.weight[old:] = mean
            if getattr(layer, "bias", None) is not None and layer.bias.shape[0] == n:
                layer.bias[old:] = layer.bias[:old].mean()


# ------------------------------------------------------------------------------------------- checkpoints
def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint holds its model in shards (train.strategy=fsdp: a torch.distributed.checkpoint folder)
    rather than in one model.safetensors: the strategy that wrote it says (lmlab.train.strategies)."""
    from ..train.strategies import sharded_format

    return sharded_format(checkpoint) is not None


def load_weights(checkpoint: Path, model: torch.nn.Module, *, adapters_only: bool = False) -> None:
    """The model weights of a complete checkpoint into `model` (a plain, unsharded one), after checking every file
    against the manifest: from model.safetensors, or gathered from a sharded checkpoint's shards in this one
    process. `adapters_only`: just the LoRA weights (`model` carries the run's adapters; its base is loaded
    already); every adapter weight must be found."""
    ckpt.verify(checkpoint)
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if "lora_" in k} if adapters_only else state
    if adapters_only and not wanted:
        raise LmlabError(f"{checkpoint}: the model has no LoRA adapters to load")
    if is_sharded(checkpoint):
        from ..train.strategies import load_sharded_weights

        found = {k: v.detach().clone() for k, v in wanted.items()}
        load_sharded_weights(checkpoint, found)
        model.load_state_dict(found, strict=not adapters_only)
        return
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    weights = str(Path(checkpoint) / "model.safetensors")
    if not adapters_only:
        load_safetensors(model, weights, strict=True)  # tied weights were saved once (safetensors.torch.save_model)
        return
    saved = {k: v for k, v in load_file(weights).items() if "lora_" in k}
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise LmlabError(f"{checkpoint}: no LoRA weights matching the run's adapters ({len(missing)} missing)")
    model.load_state_dict(saved, strict=False)


# ------------------------------------------------------------------------------------------- runs
def load_run_model(run: str | Path, merge: bool = False, *, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a run folder (a multi-stage run: its last finished stage), in eval mode on the CPU:
    final/ (a model, or a base + its LoRA adapters), else the latest complete checkpoint. A QLoRA run's adapters go
    onto the unquantised base. `dtype`: for a final/ model folder (None: as saved)."""
    run = resolve_stage(run)
    if not is_run(run):
        raise LmlabError(f"{run}: not an lmlab run folder (no config.yaml or run.json)")
    final = run / "final"
    if (final / "config.json").is_file():
        with quiet_loading():
            return load_model(str(final), dtype=dtype).eval(), load_tokenizer(str(final))
    if not (run / "config.yaml").is_file():
        raise LmlabError(f"{run}: no config.yaml, so no model to rebuild its adapters or checkpoint into")
    cfg = load_config(run / "config.yaml")
    if (final / "adapter_config.json").is_file():
        tokenizer = load_tokenizer(str(final))
        with quiet_loading():
            from peft import PeftModel

            model = PeftModel.from_pretrained(build_model(cfg, tokenizer), str(final))
    else:
        latest = latest_checkpoint(run / CHECKPOINTS)
        if latest is None:
            raise LmlabError(f"{run}: the run has neither final/ nor a complete checkpoint yet")
        tokenizer = load_tokenizer(str(run / "tokenizer"))
        model = build_model(cfg, tokenizer)
        if cfg.finetune.method != "full":
            cfg.finetune.method = "lora"  # the adapters alone, as the trainer drew them; the base is unquantised
            model = add_adapters(model, cfg)
        load_weights(latest, model, adapters_only=cfg.finetune.method != "full")
    model.eval()
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, tokenizer


def resolve_base(spec: str) -> str:
    """A base model for fine-tuning as model.name: a run folder becomes its final/ model folder (a LoRA run's
    adapters merged into `<run>/merged/` once); a run without final/ its latest checkpoint, exported once to
    `<run>/exports/step-N/`. Anything else (a model folder, a hub id, a named size) is returned as is."""
    from ..models.export import export

    if not is_run(spec):
        return spec
    run = Path(spec).resolve()
    if (run / "final" / "config.json").is_file():
        return str(run / "final")
    if (run / "final" / "adapter_config.json").is_file():
        out = run / "merged"
    else:
        latest = latest_checkpoint(run / CHECKPOINTS)
        if latest is None:
            raise ConfigError(f"model.name: run {spec} has neither final/ nor a complete checkpoint")
        out = run / "exports" / latest.name
    if not (out / "config.json").is_file():
        model, tokenizer = load_run_model(run, merge=True)
        export(model, tokenizer, out)
    return str(out)


def load_for_inference(spec: str | Path, device: str = "auto"):
    """(model, tokenizer) in eval mode on `device` from a run folder (load_run_model; a final/ model in fp32), a
    multi-stage run, a model folder (fp32) or a hub id."""
    from ..runtime import pick_device

    dev = pick_device(device)
    path = resolve_stage(spec)
    if is_run(path):
        model, tok = load_run_model(path, dtype=torch.float32)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise LmlabError(f"{spec}: no config.json (not a model folder or run folder)")
        with quiet_loading():  # what the caller prints is the output
            model, tok = load_model(str(path), dtype=torch.float32), load_tokenizer(str(path))
    else:
        model, tok = load_model(str(spec)), load_tokenizer(str(spec))
    return model.to(dev).eval(), tok
