"""lmlab export: write a run's model as a Hugging Face folder, its LoRA adapters as a PEFT adapter folder, or a
GGUF file for llama.cpp; every export carries a model card (README.md).

    lmlab export runs/sft-lora -o sft-adapter            the adapter folder (PeftModel.from_pretrained)
    lmlab export runs/sft-lora --merge -o sft-merged      adapters folded into the base: a plain model folder
    lmlab export runs/pretrain -o model                   final/ (or the latest checkpoint) as a model folder
    lmlab export runs/llama --format gguf --dtype q8_0 -o gguf     model-q8_0.gguf + README.md (LoRA runs merged)
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist)")
    p.add_argument("--merge", action="store_true",
                   help="fold LoRA adapters into the base model (logits equal base + adapters); --format gguf "
                        "always merges")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: Hugging Face folder (default); gguf: one GGUF file for llama.cpp / Ollama / LM Studio "
                        "(Llama-family models)")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "q8_0"],
                   help="--format gguf: storage of the weight matrices (norms stay f32; default f16)")
    p.add_argument("--license", default=None,
                   help="license id for the model card's metadata (e.g. apache-2.0, mit); default: other")


def run(args) -> int:
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from ..errors import ConfigError
    from ..models.export import export
    from ..runs.load import load_run_model

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; choose a new folder")
    run_dir = Path(args.run)
    if args.format == "hf" and args.dtype is not None:
        raise ConfigError("--dtype applies to --format gguf; an hf folder keeps the run's own dtype")
    args.dtype = args.dtype or "f16"
    if args.format == "gguf":
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("--format gguf needs the gguf package: pip install 'lmlab[gguf]'")
    hf_logging.disable_progress_bar()
    model, tokenizer = load_run_model(run_dir, merge=args.merge or args.format == "gguf")
    if args.format == "gguf":
        from ..ship.gguf import export_gguf, unsupported

        why = unsupported(model)  # before anything is written
        if why:
            raise ConfigError(f"--format gguf: {why}")
        path = export_gguf(model, tokenizer, out, run_dir=run_dir, dtype=args.dtype, license=args.license)
        size = path.stat().st_size
        print(f"exported  {path}  GGUF {args.dtype}, {size / 2**20:,.1f} MiB (llama.cpp: llama-cli -m {path})")
        print(f"card      {out / 'README.md'}")
        return 0
    export(model, tokenizer, out, run_dir=run_dir, license=args.license)
    kind = "adapter folder (PeftModel.from_pretrained)" if (out / "adapter_config.json").is_file() else (
        "model folder (AutoModelForCausalLM.from_pretrained)")
    print(f"exported  {out}  {kind}")
    if (out / "README.md").is_file():
        print(f"card      {out / 'README.md'}")
    return 0

