import os

import pytest
import torch

# session-wide fixtures kept in their own modules: a tokenizer trained once on the stdlib, run folders the real
# trainer wrote
pytest_plugins = ["fixture_tokenizer", "fixture_runs"]

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache; the cache is shared within one test session."""
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "lmlab-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs, then the session's count again (no module changes the
    thread count for the others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
