"""Checkpoint files: one torch.save record written atomically, loaded with weights_only=True."""

from __future__ import annotations

import io
from typing import Any

import torch

from storage.files import atomic_write_bytes, exists, read_bytes


def save_checkpoint(url: str, state: dict[str, Any]) -> None:
    """Serialize a state record (tensors, numbers, strings, lists, dicts) and write it atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(url, buf.getvalue())


def load_checkpoint(url: str) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no pickled code runs).

    Raises:
        FileNotFoundError: when no checkpoint is at the URL.
    """
    if not exists(url):
        raise FileNotFoundError(f"no checkpoint at {url}")
    return torch.load(io.BytesIO(read_bytes(url)), map_location="cpu", weights_only=True)
