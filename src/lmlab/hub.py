"""The Hugging Face hub, in one place: what counts as a hub id, whether lmlab may go online, and a quick
probe that tells "no such model" from "no network" without hanging.

Offline first: nothing here runs at import, and nothing touches the network when HF_HUB_OFFLINE or
TRANSFORMERS_OFFLINE is set.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUTHY = {"1", "on", "yes", "true"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2" or "org/name"


def is_hub_id(name: str) -> bool:
    """`org/name` or a bare legacy id such as `gpt2`, and not a path that exists here."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a config.json of `repo_id` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or an unreadable cache: not cached
        return False


def offline() -> bool:
    """HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE set (read now, not at import)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUTHY for k in OFFLINE_VARS)


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Within: huggingface_hub (and transformers through it) refuses every HTTP request at once, as under
    HF_HUB_OFFLINE=1. `from_pretrained(..., local_files_only=True)` alone still sends HEAD requests for some
    optional files (a PEFT adapter config) and retries each for up to 23 s when the hub cannot be reached.
    huggingface_hub reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`; that flag is what
    its `is_offline_mode()` answers, so it is the one set here (and restored)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the hub endpoint opens within `timeout` s, else a short reason
    (offline mode, no route, no answer). For datasets and tokenizers, whose ids the model API does not know."""
    if offline():
        return "offline mode is set (HF_HUB_OFFLINE)"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe() -> None:  # in a thread: name resolution ignores socket timeouts and can hang
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}: {e.strerror or e}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host} within {timeout:g} s"


def status(repo_id: str, endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> int | None:
    """HTTP status of the hub's model API for `repo_id` (200, 401, 404, ...), or None when nothing
    answers over verified HTTPS within `timeout` seconds in all (DNS included: the probe runs in a thread)."""
    base = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    headers = {}
    try:
        from huggingface_hub import get_token

        if token := get_token():
            headers["authorization"] = f"Bearer {token}"
    except Exception:  # no token, or an unreadable token file: ask anonymously
        pass
    request = urllib.request.Request(f"{base}/api/models/{repo_id}", method="HEAD", headers=headers)
    result: list[int] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result.append(response.status)
        except urllib.error.HTTPError as e:
            result.append(e.code)
        except (OSError, ValueError):
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else None
