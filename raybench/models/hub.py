"""Fail-fast checks before a weights download, so an offline machine gets a message, not a retry storm."""
from __future__ import annotations

import os
import socket
from pathlib import Path
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


def local_folder(checkpoint: str) -> str | None:
    """The folder a checkpoint names (`~` expanded), or None when it names none here (a hub id)."""
    path = os.path.expanduser(checkpoint)
    return path if Path(path).is_dir() else None


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hf_unavailable(checkpoint: str, what: str, loader: str) -> WeightsUnavailable | None:
    """Why the Hugging Face `checkpoint` can be neither read from the cache nor downloaded, or None when it can.

    `what` names the model in the message (Swin, ...), `loader` the transformers class that loads it."""
    if local_folder(checkpoint):
        return None
    if checkpoint.startswith(("/", "./", "../", "~")):
        return WeightsUnavailable(f"{what} checkpoint {checkpoint!r} looks like a folder, but there is no folder "
                                  "there; pass a folder written by save_pretrained, or a Hugging Face model id "
                                  "such as 'microsoft/swin-tiny-patch4-window7-224'")
    try:
        from transformers import AutoConfig
        AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        return None  # cached (a partial cache still fails later, in from_pretrained, with HF's message)
    except (OSError, ValueError):
        pass
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hf_offline() or not reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if hf_offline() else f"{endpoint} cannot be reached"
        return WeightsUnavailable(
            f"{what} weights {checkpoint!r} are not in the Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and {why}. Provide them by: "
            f"(1) downloading once where the network works (`python -c \"from transformers import "
            f"{loader} as S; S.from_pretrained('{checkpoint}')\"`) and pointing HF_HOME at "
            f"that cache, or (2) passing a local folder written by save_pretrained as the checkpoint "
            f"(`checkpoint: /path/to/folder` in the experiment file); HF_HUB_OFFLINE=1 skips the network.")
    return None
