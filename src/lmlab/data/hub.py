"""Is the Hugging Face hub reachable? Answered in a few seconds at most, so offline use fails fast instead of
sitting through huggingface_hub's retries (about a minute per file)."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_requested() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE=1 and friends), read at call time."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARS)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None if a TCP connection to the hub endpoint opens within `timeout` s, else a short reason."""
    if offline_requested():
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

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host} within {timeout:g} s"
