"""Artifact store primitives over any fsspec URL: atomic writes, reads, listing.

Every write goes to a dot-prefixed temp name in the target folder and is then renamed, so a reader
(or a resumed run) never sees a half-written file. Temp names never end in `.parquet`, because duckdb
globs would pick them up (docs/architecture.md, "Environment facts").
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


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


def file_listing(url: str, suffixes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every file below a folder whose name ends in one of `suffixes` (case-insensitive), as
    {"url", "relpath", "etag"}; the etag is the object store's ETag where it has one, else the size in bytes."""
    fs, base = _fs(url)
    if not fs.exists(base):
        raise FileNotFoundError(f"watched folder not found: {url}")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    out = []
    for path, info in sorted(fs.find(base, detail=True).items()):
        name = posixpath.basename(path)
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        etag = info.get("ETag") or info.get("etag")
        out.append({"url": protocol + path if protocol and not path.startswith(protocol) else path,
                    "relpath": posixpath.relpath(path, base.rstrip("/") or "/"),
                    "etag": str(etag).strip('"') if etag else f"size={info.get('size')}"})
    return out


class StorageLock:
    """An exclusive lock file at a URL, held for a `with` block: a second holder waits (up to `wait_s`).

    Local paths use O_EXCL; other file systems check, write a token and read it back, which closes all but a
    tiny race. A lock left by a dead process on this host is broken; one older than `stale_s` is too.
    """

    def __init__(self, url: str, *, wait_s: float = 3600.0, poll_s: float = 0.5, stale_s: float = 24 * 3600.0):
        self.url, self.wait_s, self.poll_s, self.stale_s = url, wait_s, poll_s, stale_s
        self.token = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex, "since": time.time()}

    def _try(self) -> bool:
        fs, path = _fs(self.url)
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        data = json.dumps(self.token).encode()
        if isinstance(fs, LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return json.loads(fs.cat_file(path)).get("id") == self.token["id"]

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock (pid, host, since), or None."""
        try:
            return json.loads(read_bytes(self.url))
        except (FileNotFoundError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("since", 0)) > self.stale_s:
            return True
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
        return False

    def __enter__(self) -> StorageLock:
        deadline = time.monotonic() + self.wait_s
        while not self._try():
            holder = self.holder()
            if holder is not None and self._stale(holder):
                remove(self.url)  # its holder died without releasing it
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.url} is held by {holder} and was not released within {self.wait_s:.0f} s")
            time.sleep(self.poll_s)
        return self

    def __exit__(self, *exc: object) -> None:
        if (self.holder() or {}).get("id") == self.token["id"]:
            remove(self.url)


def resolve_relative(path: str, base_file_url: str) -> str:
    """A path as written in a file at `base_file_url` (a manifest): as it is when absolute or a URL, else
    relative to that file's folder, so a folder of manifests and audio can be moved or uploaded whole."""
    if "://" in path or path.startswith("/"):
        return path
    protocol, sep, base = base_file_url.rpartition("://")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(base), path))
    if not sep:
        resolved = os.path.abspath(resolved)  # rows copied into another manifest keep pointing at the file
    return f"{protocol}{sep}{resolved}"


def relative_to(url: str, folder_url: str) -> str:
    """`url` written relative to a folder on the same file system (the inverse of `resolve_relative`)."""
    return posixpath.relpath(url.split("://", 1)[-1], folder_url.split("://", 1)[-1])
