"""lmlab: pretrain, fine-tune, evaluate and compare small language models from one CLI.

`import lmlab` is light (the CLI starts without torch). `import lmlab.models` registers lmlab's
architectures with the transformers Auto classes; exported model folders also load without it, through
`trust_remote_code=True` (see lmlab.models.export).
"""

__version__ = "0.1.0"
