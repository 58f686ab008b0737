#!/usr/bin/env bash
# The oldest release of every dependency in range (tools/oldest.txt), in its own environment, against the
# tests that touch the libraries' contracts: transformers' outputs, caches and generate, PEFT and
# bitsandbytes, the trainer end to end, chat templates. Run by .ci/run after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-oldest
. .venv-oldest/bin/activate
pip install -q torch==2.13.0 -e '.[test]' -c tools/oldest.txt
python - <<'PY'
import importlib.metadata as md
print("oldest:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "tokenizers", "peft",
      "bitsandbytes", "lm_eval", "numpy", "fastapi", "openai", "gguf")))
PY
python -m pytest -q -p no:cacheprovider -m "slow or not slow" tests/test_compat.py tests/test_generate.py tests/test_llama_hf.py \
    tests/test_lora_targets.py tests/test_trainer.py tests/test_sft.py tests/test_chat_template.py \
    tests/test_eval_harness.py tests/test_hf_api.py tests/test_serve.py tests/test_gguf.py
