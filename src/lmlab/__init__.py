"""lmlab: pretrain, fine-tune, evaluate and compare small language models from one CLI."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers lmlab's models with the transformers Auto classes)
