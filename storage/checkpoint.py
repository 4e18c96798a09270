"""Checkpoint files: one torch.save record written atomically, loaded with weights_only=True."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from storage.files import atomic_write_bytes, exists, filesystem, read_bytes

# torch.save writes a zip archive; anything else (a text file, a legacy pickle) is not an mlpl checkpoint.
_ZIP_MAGIC = b"PK\x03\x04"
_FIX = "pass a checkpoint written by mlpl, or delete it (resume then restarts the stage)"


def save_checkpoint(url: str, state: dict[str, Any]) -> None:
    """Serialize a state record (tensors, numbers, strings, lists, dicts) and write it atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(url, buf.getvalue())


def serialized_bytes(state: dict[str, Any]) -> int:
    """How many bytes `save_checkpoint` writes for this record."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


def load_checkpoint(url: str) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no pickled code runs).

    Only the structure is checked: damage inside tensor data goes unnoticed, as torch keeps no checksum.

    Raises:
        FileNotFoundError: when no checkpoint is at the URL.
        ValueError: one line naming the file when it is empty, truncated, corrupt or not a checkpoint.
    """
    if not exists(url):
        raise FileNotFoundError(f"no checkpoint at {url}")
    try:
        data = read_bytes(url)
    except IsADirectoryError:
        raise ValueError(f"{url} is not a readable mlpl checkpoint (a directory); {_FIX}") from None
    if not data:
        raise ValueError(f"{url} is not a readable mlpl checkpoint (empty file); {_FIX}")
    if not data.startswith(_ZIP_MAGIC):
        what = f"not a torch zip archive: starts {data[:8]!r}"
        raise ValueError(f"{url} is not a readable mlpl checkpoint ({what}); {_FIX}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch/pickle/zip raise many types for damaged files
        raise ValueError(f"{url} is not a readable mlpl checkpoint ({_reason(err)}); {_FIX}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{url} is not a readable mlpl checkpoint (holds a {type(state).__name__}); {_FIX}")
    return state


def read_checkpoint_fields(url: str, fields: Sequence[str]) -> dict[str, Any]:
    """Some small fields of a checkpoint (its languages, stage, step) without reading its tensors where the file is
    local (they are memory-mapped and never touched); elsewhere the whole file is read.

    Raises:
        FileNotFoundError: when no checkpoint is at the URL.
        ValueError: as `load_checkpoint`, or when a field is missing.
    """
    fs, path = filesystem(url)
    state = None
    if isinstance(fs, LocalFileSystem) and fs.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # damaged or not a zip archive: load_checkpoint says what is wrong with it
            state = None
    if not isinstance(state, dict):
        state = load_checkpoint(url)
    missing = [f for f in fields if f not in state]
    if missing:
        raise ValueError(f"{url} is not an mlpl checkpoint (missing {', '.join(missing)})")
    return {f: state[f] for f in fields}


def _reason(err: Exception) -> str:
    """The gist of a torch.load error in one short line, without torch's advice to drop weights_only."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # what the safe unpickler refused, not its long preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = " ".join(text.split())
    gist = text.split(". ", 1)[0].rstrip(".")[:120]
    return f"{type(err).__name__}: {gist}" if gist else type(err).__name__
