#!/usr/bin/env bash
# The newest torch release. torch is the one core dependency without an upper bound (pyproject.toml: a GPU
# machine brings its own build), and the README's commands pin 2.13.0 only to get the CPU build; so CI also
# installs the newest torch on PyPI (a CUDA build, run here on the CPU) with the newest releases in range, in
# its own environment, and runs the fast set against it. Run by .ci/run last.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-newest-torch
. .venv-newest-torch/bin/activate
# PIP_CONSTRAINT=/dev/null: some machines cap torch in pip's global constraints at a copy kept on their disk
if ! PIP_CONSTRAINT=/dev/null pip install -q 'torch>=2.13' -e '.[test]'; then
    echo "the newest torch could not be installed from PyPI: its run is skipped"
    exit 0
fi
python -c "import torch, transformers; print('newest torch:', torch.__version__, '| transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider
