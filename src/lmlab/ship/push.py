"""Upload an exported model folder to the Hugging Face Hub with `huggingface_hub`.

    folder = export_for_push(run, tmp, merge=False, fmt="hf")   the folder `lmlab export` would write (with its card)
    url = push_folder(folder, "org/name", token=..., private=True)   HfApi.create_repo + HfApi.upload_folder

The token is huggingface_hub's own (`get_token()`: HF_TOKEN, else the file `hf auth login` wrote). The upload
is one commit of the whole folder; the repository is created private unless asked otherwise, and an existing
repository of the same id receives a new commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConfigError(f"repository {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def token() -> str | None:
    """The Hugging Face token from the usual places (HF_TOKEN, then the saved login), or None."""
    import huggingface_hub

    return huggingface_hub.get_token()


def is_model_folder(path: Path) -> bool:
    """An exported folder: a Hugging Face model, a PEFT adapter, or GGUF file(s)."""
    path = Path(path)
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()
                              or any(path.glob("*.gguf")))


def export_for_push(source: Path, tmp: Path, *, merge: bool = False, adapter_only: bool = False, fmt: str = "hf",
                    dtype: str = "f16", license: str | None = None) -> Path:
    """The folder to upload: `source` itself when it is an exported folder, else the run exported into `tmp`
    exactly as `lmlab export` does (model, tokenizer, card). A LoRA run gives its adapter folder unless `merge`."""
    from ..config import load_config
    from ..models.export import export
    from ..runs.load import load_run_model

    source = Path(source)
    if is_model_folder(source) and not (source / "config.yaml").is_file():
        if merge or adapter_only or fmt != "hf":
            raise ConfigError(f"{source} is an exported folder: it is uploaded as it is (--merge, --adapter-only "
                              f"and --format apply to run folders)")
        return source
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"{source}: neither a run folder (config.yaml) nor an exported model folder")
    lora = load_config(source / "config.yaml").finetune.method != "full"
    if adapter_only and not lora:
        raise ConfigError(f"--adapter-only: {source} is not a LoRA/QLoRA run (finetune.method=full)")
    if adapter_only and (merge or fmt == "gguf"):
        raise ConfigError("--adapter-only: not with --merge or --format gguf (both fold the adapters into the base)")
    out = Path(tmp) / source.resolve().name
    model, tokenizer = load_run_model(source, merge=merge or fmt == "gguf")
    if fmt == "gguf":
        from .gguf import export_gguf, unsupported

        why = unsupported(model)
        if why:
            raise ConfigError(f"--format gguf: {why}")
        export_gguf(model, tokenizer, out, run_dir=source, dtype=dtype, license=license)
    else:
        export(model, tokenizer, out, run_dir=source, license=license)
    return out


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(path inside the repository, size in bytes) of every file `upload_folder` sends, sorted; hidden files and
    folders (such as a `.cache` of huggingface_hub) are left out as it leaves them out."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def push_folder(folder: Path, repo_id: str, *, token: str, private: bool = True, message: str | None = None,
                revision: str | None = None) -> str:
    """Create the model repository (private by default; kept if it exists) and upload `folder` as one commit.
    Returns the commit URL. Hub errors become one ConfigError line."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .. import hub
    from ..fsutil import first_line

    check_repo_id(repo_id)
    if hub.offline():
        raise ConfigError("offline mode is set (HF_HUB_OFFLINE): unset it to push")
    api = HfApi(token=token)
    files = [f for f, _ in folder_files(folder)]
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=message or f"Upload {len(files)} files with lmlab push",
                                 allow_patterns=files)
    except HfHubHTTPError as e:
        raise ConfigError(f"push to {repo_id}: the Hub refused ({first_line(e)})") from None
    except (OSError, httpx.HTTPError) as e:  # no route, DNS, TLS, timeouts
        raise ConfigError(f"push to {repo_id}: cannot reach the Hub ({first_line(e)})") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
