"""Tokenize once into memory-mapped token files, with a manifest and a document-level train/val split.

    corpus = prepare_corpus("stdlib", load_tokenizer())     # first call tokenizes, later calls just open
    corpus.train, corpus.val                                 # np.memmap of token ids, documents packed as
                                                             #   doc0 <eos> doc1 <eos> ...
Layout of `cache_dir()/data/<key>/` (key = hash of source fingerprint, tokenizer fingerprint, val_fraction,
seed, max_docs):

    train.bin, val.bin   raw little-endian uint16 (vocab <= 65535) or uint32 token ids
    manifest.json        what was tokenized, how, and the counts per split

The folder is built under a hidden temp name beside it and renamed into place at the end, so a killed build
leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError, DataError
from ..fsutil import atomic_dir
from . import cache_dir
from .sources import Source, describe_source, iter_documents, source_fingerprint
from .tokenizer import clean_backend, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT = 1
BATCH_DOCS = 512  # documents per encode_batch call (the fast tokenizer spreads a batch over threads)
BATCH_CHARS = 4_000_000  # ... or fewer, when documents are long


@dataclass
class Corpus:
    """A tokenized corpus: token ids of each split as read-only memory maps, plus its manifest."""

    dir: Path
    manifest: dict
    train: np.ndarray  # (n_train_tokens,) np.memmap; an empty ndarray when the split is empty
    val: np.ndarray  # (n_val_tokens,)
    eos_id: int
    vocab_size: int
    train_docs: int
    val_docs: int

    @property
    def fingerprint(self) -> str:
        """The cache key: identifies source content, tokenizer, split parameters and max_docs."""
        return self.manifest["key"]


def prepare_corpus(
    source: Source,
    tokenizer: PreTrainedTokenizerFast,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    text_field: str = "text",
    max_docs: int | None = None,
    cache_root: Path | str | None = None,
) -> Corpus:
    """Tokenize `source` with `tokenizer` into `(cache_root or cache_dir()/"data")/<key>/`, or reuse that
    folder when an identical build exists (same source fingerprint, tokenizer fingerprint, val_fraction, seed,
    max_docs).

    Document i goes to val when hash(seed, i) < val_fraction; with >= 2 documents and val_fraction > 0 at
    least one lands in val, and train is never empty. Each document's tokens are followed by the eos id;
    documents are encoded without the tokenizer's own special tokens (no BOS) and with special-token text in
    them (a literal "<|endoftext|>") encoded as plain text, so eos ids mark exactly the document ends.
    `max_docs` keeps only the first documents of the source.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs={max_docs}: must be at least 1")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer '{tokenizer.name_or_path}' has no eos token; load it with load_tokenizer")
    params = {
        "format": FORMAT,
        "source_fingerprint": source_fingerprint(source, text_field),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "val_fraction": val_fraction,
        "seed": seed,
        "max_docs": max_docs,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_root).expanduser() / key if cache_root else cache_dir() / "data" / key
    corpus = _open(final)
    if corpus is not None:
        return corpus
    if final.exists():  # not a complete build (e.g. edited by hand): start over
        shutil.rmtree(final)
    manifest = {
        **params,
        "key": key,
        "source": describe_source(source),
        "text_field": text_field,
        "tokenizer": tokenizer.name_or_path,
        "vocab_size": len(tokenizer),
        "eos_id": eos_id,
        "dtype": "uint16" if len(tokenizer) <= 65535 else "uint32",
    }
    with atomic_dir(final) as tmp:
        _build(tmp, source, tokenizer, manifest)
    corpus = _open(final)
    assert corpus is not None, f"{final}: build finished but the folder does not open"
    return corpus


def unigram_entropy(tokens: np.ndarray, vocab_size: int, ref: np.ndarray | None = None) -> float:
    """Cross-entropy (nats/token) of `tokens` under a unigram model fit on `ref` (default: `tokens` itself)
    with add-one smoothing: p(v) = (count_ref(v) + 1) / (len(ref) + vocab_size).

    exp() of it is the unigram baseline perplexity: a language model that does not beat it has learned nothing
    beyond token frequencies.
    """
    counts = _bincount(tokens, vocab_size)
    if counts.sum() == 0:
        raise ValueError("unigram_entropy: no tokens")
    ref_counts = counts if ref is None else _bincount(ref, vocab_size)
    logp = np.log(ref_counts + 1.0) - np.log(ref_counts.sum() + vocab_size)
    return float(-(counts * logp).sum() / counts.sum())


# ----------------------------------------------------------------------------------------------------------


def _open(folder: Path) -> Corpus | None:
    """The corpus in `folder` if it is a complete build of this format, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest["format"] != FORMAT:
            return None
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        arrays = {}
        for split in ("train", "val"):
            path, n = folder / f"{split}.bin", manifest[f"{split}_tokens"]
            if path.stat().st_size != n * dtype.itemsize:
                return None
            arrays[split] = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or foreign: not ours to open
        return None
    return Corpus(
        dir=folder,
        manifest=manifest,
        train=arrays["train"],
        val=arrays["val"],
        eos_id=manifest["eos_id"],
        vocab_size=manifest["vocab_size"],
        train_docs=manifest["train_docs"],
        val_docs=manifest["val_docs"],
    )


def _build(tmp: Path, source: Source, tokenizer: PreTrainedTokenizerFast, manifest: dict) -> None:
    t0 = time.perf_counter()
    log.info("tokenizing %s with %s", manifest["source"], manifest["tokenizer"])
    backend = clean_backend(tokenizer)
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not eos
    eos, vocab = manifest["eos_id"], manifest["vocab_size"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    val_fraction, seed = manifest["val_fraction"], manifest["seed"]
    docs = iter_documents(source, manifest["text_field"])
    if manifest["max_docs"] is not None:
        docs = itertools.islice(docs, manifest["max_docs"])

    ndocs = {"train": 0, "val": 0}
    ntok = {"train": 0, "val": 0}
    # the document that would move if a split ended up empty: (u, start, length) in its split's file
    most_val_like: tuple[float, int, int] | None = None  # smallest u among train documents
    most_train_like: tuple[float, int, int] | None = None  # largest u among val documents
    files = {s: (tmp / f"{s}.bin").open("wb") for s in ("train", "val")}
    try:
        index = 0
        for batch in _batches(docs):
            flat: dict[str, list[int]] = {"train": [], "val": []}
            for enc in backend.encode_batch_fast(batch, add_special_tokens=False):
                u = _uniform(seed, index)
                split = "val" if u < val_fraction else "train"
                ids = enc.ids
                ids.append(eos)
                start = ntok[split] + len(flat[split])
                if split == "train" and (most_val_like is None or u < most_val_like[0]):
                    most_val_like = (u, start, len(ids))
                if split == "val" and (most_train_like is None or u > most_train_like[0]):
                    most_train_like = (u, start, len(ids))
                flat[split].extend(ids)
                ndocs[split] += 1
                index += 1
            for split, ids in flat.items():
                if ids:
                    arr = np.asarray(ids, dtype=np.int64)
                    if arr.max() >= vocab:
                        raise DataError(
                            f"tokenizer '{manifest['tokenizer']}' produced id {arr.max()} >= its size {vocab}"
                        )
                    arr.astype(dtype).tofile(files[split])
                    ntok[split] += len(arr)
    finally:
        for f in files.values():
            f.close()

    if ndocs["val"] == 0 and ndocs["train"] >= 2 and val_fraction > 0:
        _move(tmp / "train.bin", tmp / "val.bin", most_val_like, dtype)
        ndocs, ntok = _moved(ndocs, ntok, "train", "val", most_val_like[2])
    elif ndocs["train"] == 0 and ndocs["val"] >= 1:
        _move(tmp / "val.bin", tmp / "train.bin", most_train_like, dtype)
        ndocs, ntok = _moved(ndocs, ntok, "val", "train", most_train_like[2])
    if ntok["train"] == 0:
        raise DataError(f"data source {manifest['source']!r}: tokenized to no tokens")

    manifest.update(
        train_docs=ndocs["train"],
        train_tokens=ntok["train"],
        val_docs=ndocs["val"],
        val_tokens=ntok["val"],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - t0, 2),
    )
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total_docs, seconds = ndocs["train"] + ndocs["val"], manifest["build_seconds"]
    log.info("tokenized %d documents: %d train + %d val tokens, %.1f s", total_docs, *ntok.values(), seconds)


def _batches(docs):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _uniform(seed: int, index: int) -> float:
    """A deterministic pseudo-uniform number in [0, 1) for document `index` under `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _move(src: Path, dst: Path, doc: tuple[float, int, int], dtype: np.dtype) -> None:
    """Cut the tokens of one document (`doc` = (u, start, length)) out of `src` and append them to `dst`."""
    _, start, length = doc
    mm = np.memmap(src, dtype=dtype, mode="r+")
    piece = np.array(mm[start : start + length])
    n = len(mm)
    mm[start : n - length] = mm[start + length :].copy()
    mm.flush()
    del mm
    os.truncate(src, (n - length) * dtype.itemsize)
    with dst.open("ab") as f:
        piece.tofile(f)


def _moved(ndocs: dict, ntok: dict, src: str, dst: str, length: int) -> tuple[dict, dict]:
    ndocs = {**ndocs, src: ndocs[src] - 1, dst: ndocs[dst] + 1}
    ntok = {**ntok, src: ntok[src] - length, dst: ntok[dst] + length}
    return ndocs, ntok


def _bincount(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        c = np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab_size)
        if len(c) > vocab_size:
            raise ValueError(f"unigram_entropy: token id {len(c) - 1} >= vocab_size {vocab_size}")
        counts += c
    return counts
