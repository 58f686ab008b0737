"""lmlab models: the named model sizes with their exact parameter counts."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--family", help="only this family")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def rows(family: str | None = None) -> list[dict]:
    """Per named size: its parameters with the config's own vocabulary (`vocab`) and with the vocabulary of the
    default tokenizer, what `lmlab pretrain --model NAME` builds and `lmlab estimate --model NAME` plans."""
    from ..models import FAMILIES, registry
    from ..plan.arch import default_tokenizer

    default_vocab, _ = default_tokenizer()
    out = []
    for fam in FAMILIES.values():
        if family and fam.name != family:
            continue
        for size in fam.sizes:
            cfg = registry.build_config(size)
            n = registry.count_parameters(registry.build_model(cfg, device="meta"))
            pretrain = registry.build_model(registry.build_config(size, vocab_size=default_vocab), device="meta")
            out.append({"family": fam.name, "name": size, "parameters": n,
                        "parameters_default_tokenizer": registry.count_parameters(pretrain),
                        "d_model": _dim(cfg), "layers": _layers(cfg), "vocab": cfg.vocab_size,
                        "note": fam.notes.get(size, "")})
    return out


def _dim(cfg):
    return getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None)


def _layers(cfg):
    return getattr(cfg, "n_layers", None) or getattr(cfg, "num_hidden_layers", None)


def run(args) -> int:
    import json

    from ..errors import ConfigError
    from ..models import FAMILIES

    if args.family and args.family not in FAMILIES:
        raise ConfigError(f"--family: unknown family {args.family!r}; allowed: {', '.join(FAMILIES)}")
    data = rows(args.family)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.table import Table

    from ._common import console

    table = Table(title="lmlab models (exact parameter counts, tied embeddings counted once)")
    from ..plan.arch import default_tokenizer

    vocab, _ = default_tokenizer()
    default_col = f"with {vocab:,} tokens"
    for col in ("family", "name", "parameters", "d_model", "layers", "vocab", default_col, "note"):
        numeric = col in ("parameters", "d_model", "layers", "vocab", default_col)
        table.add_column(col, justify="right" if numeric else "left", no_wrap=col != "note")
    for r in data:
        table.add_row(r["family"], r["name"], f"{r['parameters']:,}", str(r["d_model"]), str(r["layers"]),
                      f"{r['vocab']:,}", f"{r['parameters_default_tokenizer']:,}", r["note"])
    console().print(table)
    print(f"'{default_col}': the size as `lmlab pretrain --model NAME` builds it with the default tokenizer "
          f"(data.tokenizer=stdlib-bpe, data.vocab_size={vocab}); another tokenizer sets the vocabulary.")
    print("Also: any Hugging Face causal LM by local folder or hub id (model.name=meta-llama/Llama-3.2-1B).")
    return 0
