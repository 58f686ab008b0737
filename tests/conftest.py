import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# session-wide fixtures kept in their own modules: a tokenizer trained once on the stdlib, run folders the real
# trainer wrote
pytest_plugins = ["fixture_tokenizer", "fixture_runs"]

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_USER_CACHE: list[str | None] = []


def pytest_configure(config):
    """Tests never touch the user's cache: one cache for the whole session, set before any test module is
    imported, so fixtures of every scope and the processes tests start (their environments copy os.environ at
    import) use it too. Removed, and the user's setting restored, when the session ends. Only the compiled C++
    kernels (each file keyed by its source, compiler, flags and CPU) outlive the session, in pytest's own cache
    folder, so a session does not spend its first seconds compiling them again."""
    _USER_CACHE.append(os.environ.get("LMLAB_CACHE"))
    cache = Path(tempfile.mkdtemp(prefix="lmlab-test-cache-"))
    if getattr(config, "cache", None) is not None:  # absent under -p no:cacheprovider
        for kernels in ("scan_cpu", "kernels_cpu"):
            (cache / kernels).symlink_to(config.cache.mkdir(f"lmlab-{kernels}"), target_is_directory=True)
    os.environ["LMLAB_CACHE"] = str(cache)


def pytest_unconfigure(config):
    if _USER_CACHE:
        shutil.rmtree(os.environ["LMLAB_CACHE"], ignore_errors=True)
        user = _USER_CACHE.pop()
        if user is None:
            del os.environ["LMLAB_CACHE"]
        else:
            os.environ["LMLAB_CACHE"] = user


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs, then the session's count again (no module changes the
    thread count for the others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-process gloo group (rank 0 of 1) on a free local port, for strategy code tested in-process; destroyed
    after the test."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
