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
        ValueError: one line naming the file when it is empty, truncated, corrupt or not a checkpoint.
    """
    if not exists(url):
        raise FileNotFoundError(f"no checkpoint at {url}")
    data = read_bytes(url)
    fix = "pass a checkpoint written by mlpl, or delete it (resume then restarts the stage)"
    if not data:
        raise ValueError(f"{url} is not a readable mlpl checkpoint (empty file); {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch/pickle/zip raise many types for damaged files
        what = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"{url} is not a readable mlpl checkpoint ({type(err).__name__}: {what}); {fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{url} is not a readable mlpl checkpoint (holds a {type(state).__name__}); {fix}")
    return state
