"""Models for inference:

    model, tokenizer = load_for_inference("runs/<run>")    a run (final/, else its latest checkpoint),
                                                           a multi-stage run (its last finished stage),
                                                           a model folder, or a hub id

The loader is `lmlab.runs.load` (one loader from a run folder for inference, evaluation, chat, serving and
further tuning); this module keeps its name for `generate`, `chat`, `eval`, `compare` and `serve`.
"""

from __future__ import annotations

from .runs.load import load_for_inference

__all__ = ["load_for_inference"]
