"""Fail-fast checks before a weights download, so an offline machine gets a message, not a retry storm."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to provide them."""


def reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host opens within `timeout` seconds."""
    u = urlparse(url if "://" in url else f"https://{url}")
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
