"""The token corpus of a pretraining run, built from its Config (the cache of lmlab.data.shards).

    corpus = build_corpus(cfg, tokenizer, rt)     # rank 0 tokenizes (or opens the cache), then the others open it
"""

from __future__ import annotations


def build_corpus(cfg, tokenizer, rt):
    """`prepare_corpus` for data.source with the run's split (data.val_fraction, data.split_seed or train.seed),
    data.text_field and data.max_docs; rank 0 builds the cache first."""
    from .shards import prepare_corpus

    kw = dict(val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed_for(cfg.train.seed),
              text_field=cfg.data.text_field, max_docs=cfg.data.max_docs)
    return rt.main_first(lambda: prepare_corpus(cfg.data.source, tokenizer, **kw))
