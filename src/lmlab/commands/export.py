"""lmlab export: write a run's model as a Hugging Face folder, or its LoRA adapters as a PEFT adapter folder.

    lmlab export runs/sft-lora -o sft-adapter            the adapter folder (PeftModel.from_pretrained)
    lmlab export runs/sft-lora --merge -o sft-merged      adapters folded into the base: a plain model folder
    lmlab export runs/pretrain -o model                   final/ (or the latest checkpoint) as a model folder
"""

from __future__ import annotations

HELP = "write a run's model folder, or its LoRA adapter folder (--merge: adapters folded into the base)"


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist)")
    p.add_argument("--merge", action="store_true",
                   help="fold LoRA adapters into the base model (logits equal base + adapters)")


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..models.export import export
    from ..train.adapters import load_run_model

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; choose a new folder")
    model, tokenizer = load_run_model(Path(args.run), merge=args.merge)
    export(model, tokenizer, out)
    kind = "adapter folder (PeftModel.from_pretrained)" if (out / "adapter_config.json").is_file() else (
        "model folder (AutoModelForCausalLM.from_pretrained)")
    print(f"exported  {out}  {kind}")
    return 0
