"""Artifact store primitives over any fsspec URL: atomic writes, reads, listing.

Every write goes to a dot-prefixed temp name in the target folder and is then renamed, so a reader
(or a resumed run) never sees a half-written file. Temp names never end in `.parquet`, because duckdb
globs would pick them up (docs/architecture.md, "Environment facts").
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    out = url.rstrip("/")
    for part in parts:
        out = posixpath.join(out, part.strip("/")) if out else part
    return out


def exists(url: str) -> bool:
    """Whether a file or folder exists at the URL."""
    fs, path = _fs(url)
    return fs.exists(path)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write bytes to a temp name beside the target, then rename it into place."""
    fs, path = _fs(url)
    parent, name = posixpath.split(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    except Exception:
        fs.rm(tmp)
        raise


def atomic_write_text(url: str, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    """Write an object as pretty JSON atomically."""
    atomic_write_text(url, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_bytes(url: str) -> bytes:
    """Read a whole file.

    Raises:
        FileNotFoundError: when nothing is at the URL.
    """
    fs, path = _fs(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    """Read a whole file as UTF-8 text."""
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    """Read a JSON file."""
    return json.loads(read_text(url))


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Sorted URLs of the files under a folder that match a glob pattern (temp files excluded)."""
    fs, path = _fs(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    found = fs.glob(posixpath.join(path, pattern))
    out = [p for p in found if not posixpath.basename(p).startswith(".")]
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in out)


def remove(url: str) -> None:
    """Delete a file if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path)


def sha256_of(url: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (identity of a manifest or checkpoint).

    Raises:
        FileNotFoundError: when nothing is at the URL.
    """
    import hashlib

    fs, path = _fs(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def copy_file(src: str, dst: str) -> None:
    """Copy a file atomically (read whole, write to a temp name, rename)."""
    atomic_write_bytes(dst, read_bytes(src))


def open_binary(url: str):
    """A readable binary file object for a URL (a context manager), for header-only reads.

    Raises:
        FileNotFoundError: when nothing is at the URL.
    """
    fs, path = _fs(url)
    return fs.open(path, "rb")
