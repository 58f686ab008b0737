"""lmlab import: turn a checkpoint of the original MambaSWELU or INL-LLM code into a model folder."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="the original's .pt file (a state dict, or a dict with model_state_dict)")
    p.add_argument("out", help="folder to write (config.json, model.safetensors); loads with from_pretrained")
    p.add_argument("--kind", default="auto", choices=["auto", "mamba-swelu", "inl-v0", "inl-v1"],
                   help="which original wrote it (default: recognised from the parameter names)")
    p.add_argument("--config", help="JSON file of the original's hyper-parameters, when the .pt has none "
                                    "(INL: num_iterations_per_layer, num_heads, max_seq_len, dropout)")
    p.add_argument("--iterations", type=int, help="INL: integrator iterations per layer, if not in the config")
    p.add_argument("--tokenizer", help="a tokenizer folder to save beside the model (the originals used GPT-2's)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow arbitrary pickled objects in the .pt (only for files you trust)")


def run(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..models import originals

    path = Path(args.checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint: no such file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not args.unsafe_pickle)
    except Exception as e:  # noqa: BLE001 (torch raises several kinds for pickles it refuses)
        raise ConfigError(f"checkpoint: cannot read {path} safely ({type(e).__name__}); if you trust the file, "
                          "add --unsafe-pickle") from None
    try:
        sd, hyper = originals.unwrap_checkpoint(obj)
        if args.config:
            hyper.update(json.loads(Path(args.config).read_text()))
        if args.iterations is not None:
            hyper["num_iterations_per_layer"] = args.iterations
        config, state = originals.convert(sd, hyper, None if args.kind == "auto" else args.kind)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"checkpoint: {e}") from None
    from ..models import build_model

    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = build_model(config).to(dtype)  # buffers the original did not save (V0's amplitude) keep their init
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("inl.amplitude")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint: weights do not fit the inferred model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    model.tie_weights()
    out = Path(args.out)
    from ..fsutil import atomic_dir
    from ..models.export import write_auto_map

    with atomic_dir(out, overwrite=True) as tmp:  # complete or untouched
        model.save_pretrained(tmp)
        write_auto_map(model, tmp)
        if args.tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(tmp)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"imported {originals.detect_kind(sd) if args.kind == 'auto' else args.kind} ({n:,} parameters) "
          f"→ {out}")
    if getattr(config, "leaky", ""):
        print(f"note: {config.leaky} reproduces the original's evaluation; to fine-tune, set "
              "model.context_mean=causal model.alpha_form=l2")
    return 0
