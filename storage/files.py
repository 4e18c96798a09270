"""Artifact store primitives over any fsspec URL: atomic writes, reads, listing.

A reader (or a resumed run) never sees a half-written file. On object stores (s3://, gs://, az://) a whole
object is written in one PUT, which the store makes visible all at once; elsewhere a write goes to a
dot-prefixed temp name in the target folder and is then renamed. Temp names never end in `.parquet`, because
duckdb globs would pick them up (docs/architecture.md, "Environment facts").

Object stores are reached with their client's own configuration, so nothing here takes credentials or an
endpoint: for S3, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` and `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`)
for an S3 API other than AWS; subprocesses and workers inherit them. Listings are never cached: other
processes write to the same bucket.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import socket
import tempfile
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

# Object stores whose PUT (single or multipart) makes an object appear complete or not at all; "rename" there
# is a copy and a delete, so the final name is written directly.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of a URL and the path on it, without a listings cache on remote stores."""
    fs, path = fsspec.core.url_to_fs(url)
    cached = getattr(getattr(fs, "dircache", None), "use_listings_cache", False)
    if cached and not isinstance(fs, LocalFileSystem | MemoryFileSystem):
        # s3fs/gcsfs cache listings per process with no expiry, and `exists` answers from them: a file that a
        # corpus worker, a Dask worker or the next scheduled run wrote would stay invisible here.
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fs, path


_fs = filesystem


def _atomic_put(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & _ATOMIC_PUT_PROTOCOLS)


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
    """Write bytes so that readers see the old file or the whole new one: one PUT on an object store, else a
    temp name beside the target renamed into place (`AtomicWriter`)."""
    with AtomicWriter(url) as out:
        out.write(data)


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


def with_protocol(path: str, like: str) -> str:
    """A path of a file system, as its fsspec listing gives it, written as a URL with the protocol of `like`."""
    protocol = like.split("://", 1)[0] + "://" if "://" in like else ""
    return path if not protocol or path.startswith(protocol) else protocol + path


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Sorted URLs of the files under a folder that match a glob pattern (temp files excluded)."""
    fs, path = _fs(url)
    found = fs.glob(posixpath.join(path, pattern))
    return sorted(with_protocol(p, url) for p in found if not posixpath.basename(p).startswith("."))


def size_of(url: str) -> int:
    """A file's size in bytes."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def remove(url: str) -> None:
    """Delete a file if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path)


def remove_tree(url: str) -> None:
    """Delete a folder and everything below it, if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy_tree(src: str, dst: str) -> None:
    """Copy a folder to `dst` on the same file system; `dst` appears whole or not at all (copied under a temporary
    name, then renamed); an existing `dst` is left as it is.

    Raises:
        FileNotFoundError: when `src` is not a folder.
        ValueError: when `src` and `dst` are on different file systems.
    """
    fs, src_path = _fs(src)
    dfs, dst_path = _fs(dst)
    if not fs.isdir(src_path):
        raise FileNotFoundError(f"no folder to copy at {src}")
    if type(fs) is not type(dfs):
        raise ValueError(f"copy_tree copies within one file system: {src} and {dst} are on two")
    if fs.exists(dst_path):
        return
    partial = f"{dst_path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if isinstance(fs, LocalFileSystem):
            shutil.copytree(src_path, partial)
        else:
            fs.copy(src_path, partial, recursive=True)
        fs.mv(partial, dst_path, recursive=True)
    finally:
        if fs.exists(partial):
            fs.rm(partial, recursive=True)


def download_tree(src: str, dst: str) -> None:
    """Copy every file under a folder of any file system into a local folder (an object store's prefix, to
    inspect or compare it locally)."""
    fs, src_path = _fs(src)
    for found in fs.find(src_path):
        target = os.path.join(dst, posixpath.relpath(found, src_path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(found, target)


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
    """Copy a file atomically (read whole, then `atomic_write_bytes`), across file systems too."""
    atomic_write_bytes(dst, read_bytes(src))


def local_folder(url: str, names: list[str], key: str) -> str:
    """A local path holding the named files of a folder URL: the folder itself when it is local, else a copy in
    the temp dir under `key` (e.g. the content's hash), fetched once per machine. Native libraries (KenLM) read
    only local files."""
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    local = os.path.join(tempfile.gettempdir(), "mlpl-cache", key)
    for name in names:
        target = os.path.join(local, name)
        if not os.path.exists(target):
            copy_file(join(url, name), target)
    return local


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
    out = []
    for path, info in sorted(fs.find(base, detail=True).items()):
        name = posixpath.basename(path)
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        etag = info.get("ETag") or info.get("etag")
        out.append({"url": with_protocol(path, url),
                    "relpath": posixpath.relpath(path, base.rstrip("/") or "/"),
                    "etag": str(etag).strip('"') if etag else f"size={info.get('size')}"})
    return out


class StorageLock:
    """An exclusive lock file at a URL, held for a `with` block: a second holder waits (up to `wait_s`).

    Local paths use O_EXCL; other file systems check, write a token and read it back, which closes all but a
    tiny race. A lock left by a dead process on this host is broken; one older than `stale_s` is too.
    """

    def __init__(self, url: str, *, wait_s: float = 3600.0, poll_s: float = 0.5, stale_s: float = 24 * 3600.0,
                 busy: str | None = None):
        self.url, self.wait_s, self.poll_s, self.stale_s = url, wait_s, poll_s, stale_s
        self.busy = busy  # what a refused holder is told to do, after who holds the lock
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
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('since', 0))))}"
                       if holder else "another process")
                raise TimeoutError(f"{self.url} is held by {who} and was not released within {self.wait_s:.0f} s"
                                   + (f": {self.busy}" if self.busy else ""))
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


def is_local(url: str) -> bool:
    """Whether a URL names a file on this machine's file system (a plain path or file://)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The plain path of a local URL (`file://` stripped)."""
    return url.removeprefix("file://")


class DiskFullError(OSError):
    """No space left while writing a file: the message names it and says what to do."""


def disk_full(err: OSError, url: str) -> DiskFullError | None:
    """`err` restated when it is a full disk (ENOSPC, or a quota: EDQUOT): which file, how much room is left, and
    what to do; None for any other error (and for one restated already)."""
    if isinstance(err, DiskFullError) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    folder = posixpath.dirname(local_path(url)) if is_local(url) else None
    free = ""
    if folder and os.path.isdir(folder):
        free = f", {shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    return DiskFullError(err.errno, f"no space left writing {url}{free}: free space (or point the run at another "
                                    "folder) and rerun the same command; what was committed is kept, nothing "
                                    "half-written is")


@contextlib.contextmanager
def _naming_a_full_disk(url: str):
    """Inside the block, a full-disk OSError is raised again as `disk_full`'s, naming `url`; others as they are."""
    try:
        yield
    except OSError as err:
        full = disk_full(err, url)
        if full is None:
            raise
        raise full from err


class _SpaceChecked:
    """A writable stream whose full-disk errors name the file being written (`disk_full`)."""

    def __init__(self, stream: Any, url: str):
        self._stream, self._url = stream, url

    def write(self, data: bytes) -> int:
        """Append bytes."""
        with _naming_a_full_disk(self._url):
            return self._stream.write(data)

    def close(self) -> None:
        """Flush and close."""
        with _naming_a_full_disk(self._url):
            self._stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _temp_name(name: str) -> str:
    """A dot-prefixed temp name beside `name` that says who writes it: `.<name>.tmp-<host>-<pid>-<random>`."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _writer_dead(temp_name: str, modified: float | None, stale_s: float) -> bool:
    """Whether a temp file's writer is gone: its pid is dead on this host, or it is older than `stale_s` (another
    host's, or a name from before temp names carried their writer)."""
    suffix = temp_name.rsplit(".tmp-", 1)[-1]
    parts = suffix.rsplit("-", 2)
    if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False
    return modified is not None and time.time() - modified > stale_s


def sweep_temp_files(folder: str, stale_s: float = 24 * 3600.0) -> list[str]:
    """Remove the temp files under `folder` whose writer died (a SIGKILL leaves its temp file: nothing under a
    final name is ever half-written, but the bytes stay); returns what it removed. A live writer's are kept."""
    fs, path = _fs(folder)
    if _atomic_put(fs) or not fs.exists(path):  # object stores get no temp files: no listing of a whole root
        return []
    removed = []
    for found in fs.glob(posixpath.join(path, "**", ".*.tmp-*")):
        try:
            modified = fs.modified(found).timestamp()
        except (NotImplementedError, FileNotFoundError, AttributeError):
            modified = None
        if _writer_dead(posixpath.basename(found), modified, stale_s):
            fs.rm(found)
            removed.append(found)
    return removed


class AtomicWriter:
    """A file written as a stream and made visible whole by `commit()`: on object stores the upload completes
    at commit; elsewhere it goes to a dot-prefixed temp name beside the target, renamed at commit. `abort()`
    (or leaving a `with` block on an error) drops it. A full disk is an error naming the file (`disk_full`)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = _fs(url)
        parent, name = posixpath.split(self.path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        self.tmp = self.path if _atomic_put(self.fs) else posixpath.join(parent, _temp_name(name))
        self.file = _SpaceChecked(self.fs.open(self.tmp, "wb"), url)

    def write(self, data: bytes) -> None:
        """Append bytes."""
        self.file.write(data)

    def commit(self) -> None:
        """Close the stream and make the file visible under its name (replacing an older one)."""
        try:
            with _naming_a_full_disk(self.url):
                if not self.file.closed:
                    self.file.close()
                if self.tmp != self.path:
                    self.fs.mv(self.tmp, self.path)
        except Exception:
            self.abort()  # a failed close or rename leaves no temp file behind
            raise

    def abort(self) -> None:
        """Drop what was written (an error half-way)."""
        if self.tmp == self.path:
            # An object store's upload is discarded when it is not completed: abandon it without closing.
            discard = getattr(self.file, "discard", None)
            if discard is not None:
                discard()
                return
        if not self.file.closed:
            close_quietly(self.file)  # a full disk fails the flush too; the temp file goes either way
        if self.tmp != self.path and self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def close_quietly(stream: Any) -> None:
    """Close a stream on the way out of an error: it may be broken already, and the temp file it wrote to goes
    either way, so a second error here would only hide the first."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - see the docstring
        pass
