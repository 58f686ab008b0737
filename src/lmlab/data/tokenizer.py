"""Tokenizers: train a byte-level BPE (`tokenizers`), or load one (local folder, tokenizer.json, hub id, or
the embedded `stdlib-bpe`). Everything returned is a `transformers` fast tokenizer with an eos token.

    train_bpe(source, vocab_size, out_dir)   byte-level BPE, saved for AutoTokenizer.from_pretrained(out_dir)
    load_tokenizer(spec)                     "stdlib-bpe" | folder | tokenizer.json | hub id
    tokenizer_fingerprint(tok)               16 hex chars identifying the exact tokenization

What lmlab saves needs no code beyond transformers: a tokenizer.json, the chat template (chat_template.jinja)
and a tokenizer_config.json naming `PreTrainedTokenizerFast` (the name every transformers release reads;
transformers 5 alone would write `TokenizersBackend`), never an `auto_map`. Loading a folder never runs
code shipped in it, so a model folder whose config.json names its own code (`auto_map`) does not make
transformers ask "Do you wish to run the custom code?" when lmlab reads its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import ConfigError, DataError
from ..fsutil import atomic_dir, first_line
from ..hub import unreachable as hub_unreachable
from . import cache_dir
from .sources import Source, iter_documents

EOS = "<|endoftext|>"
PORTABLE_CLASS = "PreTrainedTokenizerFast"
# files that make a folder a tokenizer folder for AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def train_bpe(
    source: Source,
    vocab_size: int,
    out_dir: Path | str,
    text_field: str = "text",
    max_chars: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style: no unknown tokens, lossless decode) with `<|endoftext|>` as its
    only special token (id 0; also bos), save it to `out_dir` and return it as loaded back from there.

    `max_chars` caps the training text (the first `max_chars` characters of the source, in order), which
    bounds time. A small corpus may yield fewer than `vocab_size` tokens. An existing tokenizer folder at
    `out_dir` is replaced atomically; any other non-empty folder there is an error.
    """
    _check_vocab(vocab_size)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "tokenizer.json").exists():
        raise DataError(f"{out_dir}: folder is not empty and holds no tokenizer; choose another one")
    tok = _train(iter_documents(source, text_field), vocab_size, max_chars)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        tok.save_pretrained(tmp)
    return _load_folder(out_dir)


def load_tokenizer(spec: str = "stdlib-bpe", vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Load a tokenizer by `spec`; the result always has an eos token (`<|endoftext|>` added if missing).

    - "stdlib-bpe": the embedded default, a byte-level BPE of `vocab_size` trained on the full "stdlib" corpus
      (~12 MB of Python, no `max_chars` cap: ~5-10 s on 2 cores) on first use, then cached at
      `cache_dir()/tokenizers/stdlib-bpe-<vocab>-<python major.minor>`.
    - a folder with tokenizer files (from `lmlab tokenizer train`, a model export, ...) or a tokenizer.json.
    - a Hugging Face hub id ("gpt2", "meta-llama/Llama-3.2-1B"): the local hub cache first; the network only
      if that misses, and only after a ~3 s reachability probe, so offline use fails fast with a DataError.
    """
    if spec == "stdlib-bpe":
        return _stdlib_bpe(vocab_size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if path.suffix != ".json":
            raise DataError(f"tokenizer '{spec}': expected a folder or a tokenizer.json file")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as e:
            raise DataError(f"tokenizer '{spec}': not a valid tokenizer.json ({first_line(e)})") from None
        return _ensure_eos(tok, spec)
    if spec.startswith((".", "/", "~")) or spec.endswith(".json") or "\\" in spec:
        raise DataError(f"tokenizer '{spec}': no such file or folder")
    return _load_hub(spec)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 (first 16 hex) of the serialized backend tokenizer (`to_str()`), with the padding/truncation
    state that `transformers` calls leave behind reset, so it only changes when tokenization does."""
    return hashlib.sha256(clean_backend(tok).to_str().encode()).hexdigest()[:16]


def clean_backend(tok: PreTrainedTokenizerFast) -> Tokenizer:
    """A private copy of `tok`'s `tokenizers.Tokenizer` with no padding and no truncation.

    (A `transformers` call with `padding=`/`truncation=` leaves that state set on the shared backend.)"""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer '{tok.name_or_path}': lmlab needs a fast tokenizer (a tokenizer.json)")
    clean = Tokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    return clean


# ----------------------------------------------------------------------------------------------------------


def _train(docs: Iterable[str], vocab_size: int, max_chars: int | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(docs, max_chars), trainer)
    return PortableTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


class PortableTokenizerFast(PreTrainedTokenizerFast):
    """transformers' fast tokenizer, saved so that any transformers release loads it without remote code:
    tokenizer_config.json names `PreTrainedTokenizerFast` and carries no `auto_map`."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "tokenizer_config.json"
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config["tokenizer_class"] = PORTABLE_CLASS
            config.pop("auto_map", None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


def portable(tok):
    """`tok` saving as a plain PreTrainedTokenizerFast when it is one (a hub tokenizer of its own class keeps it)."""
    if type(tok) is PreTrainedTokenizerFast:
        tok.__class__ = PortableTokenizerFast
    return tok


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + eos)")


def _capped(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    if max_chars is None:
        yield from docs
        return
    if max_chars <= 0:
        raise ConfigError(f"max_chars={max_chars}: must be positive")
    left = max_chars
    for doc in docs:
        yield doc[:left]
        left -= len(doc)
        if left <= 0:
            return


def _stdlib_bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache_dir() / "tokenizers" / f"stdlib-bpe-{vocab_size}-{py}"
    if not (folder / "tokenizer.json").is_file():
        _check_vocab(vocab_size)
        tok = _train(iter_documents("stdlib"), vocab_size, None)
        with atomic_dir(folder) as tmp:  # a concurrent identical build may win; both are the same
            tok.save_pretrained(tmp)
    return _load_folder(folder)


def _load_folder(folder: Path) -> PreTrainedTokenizerFast:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"tokenizer '{folder}': no tokenizer files in the folder (expected tokenizer.json)")
    try:
        if _plain_class(folder):  # read directly: AutoTokenizer would read a model's config.json first
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        else:  # trust_remote_code=False: a folder's own code never runs, and transformers never asks about it
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise DataError(f"tokenizer '{folder}': cannot load ({first_line(e)})") from None
    return _ensure_eos(tok, str(folder))


def _plain_class(folder: Path) -> bool:
    """The folder's tokenizer_config.json names transformers' generic fast tokenizer, without code of its own."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("tokenizer_class") in (PORTABLE_CLASS, "TokenizersBackend") and "auto_map" not in config


def _load_hub(name: str) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)  # cached: offline
    except Exception:
        if hub_unreachable():
            raise DataError(
                f"tokenizer '{name}': not found locally and the Hugging Face hub is unreachable (offline?); "
                "pass a local folder or train one with `lmlab tokenizer train`"
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        except Exception as e:
            raise DataError(
                f"tokenizer '{name}': cannot load from the Hugging Face hub ({first_line(e)}); "
                "check the name (gated models need `hf auth login`)"
            ) from None
    return _ensure_eos(tok, name)


def _ensure_eos(tok, spec: str) -> PreTrainedTokenizerFast:
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataError(f"tokenizer '{spec}': lmlab needs a fast tokenizer (a tokenizer.json)")
    if tok.eos_token is None:
        if EOS in tok.get_vocab():
            tok.eos_token = EOS
        else:
            tok.add_special_tokens({"eos_token": EOS})
    return portable(tok)
