"""lmlab push: upload a run's exported model (weights, tokenizer, model card) to the Hugging Face Hub.

    lmlab push runs/llama-small me/llama-small                private repository, Hugging Face folder + card
    lmlab push runs/sft-lora me/sft-lora                      a LoRA run: its adapter folder (the default)
    lmlab push runs/sft-lora me/sft-merged --merge            ... or the merged model
    lmlab push runs/llama-small me/llama-gguf --format gguf --dtype q8_0 --public
    lmlab push runs/llama-small me/x --dry-run                list what would be uploaded; nothing is sent

The token is huggingface_hub's (HF_TOKEN, or `hf auth login`). An exported folder (from `lmlab export`) is
uploaded as it is.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder (exported on the fly, as `lmlab export` does) or an exported folder")
    p.add_argument("repo", metavar="ORG/NAME", help="Hub model repository (created if missing)")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--adapter-only", action="store_true",
                      help="LoRA/QLoRA run: upload the adapter folder only (the default for such runs)")
    mode.add_argument("--merge", action="store_true", help="LoRA/QLoRA run: upload the model with adapters merged")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf folder (default) or a GGUF file")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "q8_0"],
                   help="--format gguf: weight storage (default f16)")
    p.add_argument("--license", default=None, help="license id for the model card (e.g. apache-2.0)")
    p.add_argument("-m", "--message", default=None, help="commit message")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--dry-run", action="store_true", help="export and list the files that would be uploaded; "
                                                          "no token needed, nothing is sent")


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from ..errors import ConfigError
    from ..ship.push import check_repo_id, export_for_push, folder_files, push_folder, token

    check_repo_id(args.repo)
    if args.format == "hf" and args.dtype is not None:
        raise ConfigError("--dtype applies to --format gguf")
    args.dtype = args.dtype or "f16"
    tok = token()
    if tok is None and not args.dry_run:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="lmlab-push-") as tmp:
        folder = export_for_push(Path(args.run), Path(tmp), merge=args.merge, adapter_only=args.adapter_only,
                                 fmt=args.format, dtype=args.dtype, license=args.license)
        files = folder_files(folder)
        visibility = "public" if args.public else "private"
        print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files "
              f"({sum(s for _, s in files) / 2**20:,.1f} MiB) to {args.repo} ({visibility})")
        for name, size in files:
            print(f"  {name:<40} {size:>14,} bytes")
        if args.dry_run:
            print(f"dry run: nothing sent{'' if tok else ' (no token found: set HF_TOKEN or `hf auth login`)'}")
            return 0
        url = push_folder(folder, args.repo, token=tok, private=not args.public, message=args.message,
                          revision=args.revision)
    print(f"pushed    {url}")
    return 0
