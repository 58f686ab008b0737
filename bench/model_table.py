"""Exact parameter counts of every named model size, as markdown tables for docs/models.md.

    python bench/model_table.py            # all tables
    python bench/model_table.py --sizes    # only the table of named sizes

Everything is built on the meta device (no memory, any size); counts are unique parameters, tied
embeddings counted once. Sections: every named size; INL-LLM attention vs projection context and the
original code's count; llama baselines vs MambaSWELU; MambaSWELU-124m variants against the 124,104,719
quoted by the original project.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from lmlab.models import FAMILIES, build_config, registry


def shape(cfg) -> str:
    if cfg.model_type == "mamba_swelu":
        return f"d {cfg.d_model}, {cfg.n_layers} layers, expand {cfg.expand}, dense {cfg.dense_hidden}"
    if cfg.model_type == "inl_llm":
        return (f"d {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
                f"{cfg.n_iterations} iterations, ff {cfg.ff_dim}")
    return (f"d {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
            f"ff {cfg.intermediate_size}")


def human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def sizes_table() -> list[str]:
    rows = ["| name | family | vocab | shape | parameters |", "|---|---|---:|---|---:|"]
    for fam in FAMILIES.values():
        for name in fam.sizes:
            cfg = build_config(name)
            n = registry.parameter_count(name)
            rows.append(f"| `{name}` | {fam.name} | {cfg.vocab_size} | {shape(cfg)} | {n:,} ({human(n)}) |")
    return rows


def inl_original_count(cfg) -> int:
    """The original INL-LLM code's count. Per block: 2 LayerNorms, a d×d context projection with bias,
    4 controller MLPs 3d → k → d (k = 64), μ, γ, φ (d each), a GELU FF with biases. Then a final
    LayerNorm, fixed sinusoidal positions (no parameters) and a tied head."""
    d, k, ff = cfg.d_model, cfg.controller_hidden, cfg.ff_dim
    per_layer = 4 * d + (d * d + d) + 4 * (3 * d * k + k + k * d + d) + 3 * d + (2 * d * ff + ff + d)
    return cfg.vocab_size * d + cfg.n_layers * per_layer + 2 * d


def inl_table() -> list[str]:
    rows = ["| name | context=attention | context=projection | original code | projection − original |",
            "|---|---:|---:|---:|---:|"]
    for name in FAMILIES["inl"].sizes:
        cfg = build_config(name)
        att = registry.parameter_count(name)
        proj = registry.parameter_count(name, overrides={"context": "projection"})
        orig = inl_original_count(cfg)
        rows.append(f"| `{name}` | {att:,} ({human(att)}) | {proj:,} ({human(proj)}) | "
                    f"{orig:,} ({human(orig)}) | {proj - orig:,} |")
    return rows


def llama_table() -> list[str]:
    rows = ["| size | mamba-swelu | llama | difference |", "|---|---:|---:|---:|"]
    for size in ("tiny", "small", "124m", "350m"):
        m = registry.parameter_count(f"mamba-swelu-{size}")
        ll = registry.parameter_count(f"llama-{size}")
        rows.append(f"| {size} | {m:,} | {ll:,} | {100 * (ll - m) / m:+.2f} % |")
    return rows


QUOTED_124M = 124_104_719


def mamba_variants_table() -> list[str]:
    base = "mamba-swelu-124m"
    variants = {
        "lmlab default (LayerNorm, expand 2, d_state 16, dt_rank 64, dense 2048, 1024 positions, tied)": {},
        "untied LM head": {"tie_word_embeddings": False},
        "dense hidden 4096": {"dense_hidden": 4096},
        "2048 learned positions": {"max_seq_len": 2048},
        "expand 3": {"expand": 3},
        "d_state 64": {"d_state": 64},
        "RMSNorm": {"norm": "rmsnorm"},
        "8 Mamba layers": {"n_layers": 8},
        "9 Mamba layers": {"n_layers": 9},
        "4 dense layers": {"n_dense": 4},
    }
    rows = ["| variant of mamba-swelu-124m | parameters | − 124,104,719 |", "|---|---:|---:|"]
    for label, overrides in variants.items():
        n = registry.parameter_count(base, overrides=overrides)
        rows.append(f"| {label} | {n:,} | {n - QUOTED_124M:+,} |")
    hits = grid_search_124m()
    rows.append(f"| any of {hits[0]} grid combinations (layers 4–12 × expand 1–4 × d_state 8/16/32/64 × "
                f"dense 2048/3072/4096 × positions 1024/2048 × tied/untied) | exact hits: {len(hits[1])} | |")
    fallback = original_fallback_count()
    rows.append(f"| the original repository's fallback block when `mamba-ssm` is absent (see text) | "
                f"{fallback:,} | {fallback - QUOTED_124M:+,} |")
    return rows


def grid_search_124m() -> tuple[int, list[dict]]:
    """Counts are affine in n_layers: two meta builds per (expand, d_state, dense, positions, tie) suffice."""
    hits, total = [], 0
    grid = itertools.product((1, 2, 3, 4), (8, 16, 32, 64), (2048, 3072, 4096), (1024, 2048), (True, False))
    for expand, d_state, dense, pos, tie in grid:
        o = dict(expand=expand, d_state=d_state, dense_hidden=dense, max_seq_len=pos, tie_word_embeddings=tie)
        one = registry.parameter_count("mamba-swelu-124m", overrides={**o, "n_layers": 1})
        two = registry.parameter_count("mamba-swelu-124m", overrides={**o, "n_layers": 2})
        for layers in range(4, 13):
            total += 1
            if one + (layers - 1) * (two - one) == QUOTED_124M:
                hits.append({**o, "n_layers": layers})
    return total, hits


def original_fallback_count(d: int = 1024, layers: int = 6, expand: int = 2, d_state: int = 16,
                            d_conv: int = 4, vocab: int = 50257, positions: int = 1024,
                            dense: int = 2048) -> int:
    """Parameter shapes of the original project's model when `mamba-ssm` is not installed: each block is
    LayerNorm → [in_proj, depthwise conv1d, SWELU, sigmoid gate, out_proj] → SWELU, and also holds an x_proj
    (d_inner → d_state) and a dt_proj (d_inner → d_inner, bias) that its forward never uses; SWELU has a
    single learnable k. Built here on the meta device from shapes only."""
    e = expand * d
    with torch.device("meta"):
        block = nn.ModuleDict(dict(
            norm=nn.LayerNorm(d), in_proj=nn.Linear(d, 2 * e, bias=False),
            conv1d=nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1),
            x_proj=nn.Linear(e, d_state, bias=False), dt_proj=nn.Linear(e, e),
            out_proj=nn.Linear(e, d, bias=False),
        ))
        head = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(positions, d), norm_f=nn.LayerNorm(d),
            dense1=nn.Linear(d, dense), dense2=nn.Linear(dense, dense), dense3=nn.Linear(dense, d),
        ))
    swelu_k = 2 * layers + 3  # one k per block activation, per block's inner activation, per dense layer
    return layers * registry.count_parameters(block) + registry.count_parameters(head) + swelu_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", action="store_true", help="only the table of named sizes")
    args = ap.parse_args()
    sections = [("Every named size", sizes_table)]
    if not args.sizes:
        sections += [("INL-LLM: context variants and the original code", inl_table),
                     ("Llama baselines vs MambaSWELU", llama_table),
                     ("MambaSWELU-124m vs the quoted 124,104,719", mamba_variants_table)]
    for title, fn in sections:
        print(f"### {title}\n")
        print("\n".join(fn()))
        print()


if __name__ == "__main__":
    main()
