"""Storage that fails on purpose, for `make faults` (pipeline/studies/faults.py): a local disk that fills up after
a byte budget (`fulldisk://<path>`, registered with fsspec on import, so any URL of the pipeline can point at it),
an S3 API that throttles, errs and drops connections on a share of requests (`FlakyS3Proxy`); and the check for
what no fault may leave behind (`partial_files`)."""

from __future__ import annotations

import errno
import http.client
import json
import os
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

FULL_DISK_PROTOCOL = "fulldisk"


class FullDiskFileSystem(LocalFileSystem):
    """The local file system with a byte budget for writes, shared by every file this process writes: once spent,
    a write raises ENOSPC as a full disk does (the bytes that fitted are written, the rest are not)."""

    protocol = FULL_DISK_PROTOCOL
    budget_bytes: int | None = None  # None: unlimited
    written_bytes = 0
    # Every file opened for writing since the budget was set: (path, bytes written before it was opened).
    opened: list[tuple[str, int]] = []

    @classmethod
    def set_budget(cls, budget_bytes: int | None) -> None:
        """Allow `budget_bytes` more bytes in this process (None: no limit) and reset the counts."""
        cls.budget_bytes, cls.written_bytes, cls.opened = budget_bytes, 0, []

    @classmethod
    def file_spans(cls) -> list[tuple[str, int, int]]:
        """(path, first byte, bytes) of every file written since the budget was set: where a budget ends in it."""
        ends = [start for _, start in cls.opened[1:]] + [cls.written_bytes]
        return [(path, start, end - start) for (path, start), end in zip(cls.opened, ends, strict=True)]

    @classmethod
    def take(cls, n: int) -> int:
        """How many of `n` bytes still fit, counted as written."""
        room = n if cls.budget_bytes is None else max(0, min(n, cls.budget_bytes - cls.written_bytes))
        cls.written_bytes += room
        return room

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any):
        f = super()._open(path, mode, block_size=block_size, **kwargs)
        if not any(c in mode for c in "wax"):
            return f
        FullDiskFileSystem.opened.append((path, FullDiskFileSystem.written_bytes))
        return _BudgetedFile(f)


class _BudgetedFile:
    """A local file whose writes stop with ENOSPC when the process's budget is spent."""

    def __init__(self, f: Any):
        self._f = f

    def write(self, data: bytes) -> int:
        """Write what fits; ENOSPC when not all of it did."""
        room = FullDiskFileSystem.take(len(data))
        self._f.write(data[:room])
        if room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _BudgetedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


fsspec.register_implementation(FULL_DISK_PROTOCOL, FullDiskFileSystem, clobber=True)


def partial_files(folder: str, temp_ok: bool = False) -> list[str]:
    """Files that a reader must never see: files under a final name that do not read whole (Parquet, tar, JSON),
    and temp files left behind (`temp_ok`: right after a SIGKILL, which no process survives to clean up; the
    next run removes them)."""
    bad = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file() or p.suffix == ".lock":
            continue
        if ".tmp-" in p.name:
            if not temp_ok:
                bad.append(f"temp file left: {p}")
            continue
        try:
            if p.suffix == ".parquet":
                pq.read_table(p)
            elif p.suffix == ".tar":
                with tarfile.open(p) as tar:
                    for m in tar.getmembers():
                        tar.extractfile(m).read()
            elif p.suffix == ".json":
                json.loads(p.read_text())
        except Exception as err:  # any failure to read is what this looks for
            bad.append(f"unreadable under its final name: {p} ({type(err).__name__})")
    return bad


class FlakyS3Proxy:
    """An HTTP proxy in front of an S3 API (moto's server) that fails a share of requests as an object store under
    load does: 503 SlowDown (throttling), 500 InternalError, or a connection dropped before any answer. Point
    `AWS_ENDPOINT_URL_S3` at `endpoint`."""

    FAULTS = ("slowdown", "internal_error", "dropped")

    def __init__(self, upstream: str, fail_share: float, seed: int = 0):
        import random
        import threading
        from http.server import ThreadingHTTPServer

        self.upstream = urllib.parse.urlsplit(upstream)
        self.fail_share = fail_share
        self.injected = dict.fromkeys(self.FAULTS, 0)
        self.requests = 0
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.fail_share:
                return None
            fault = self._rng.choice(self.FAULTS)
            self.injected[fault] += 1
            return fault

    def _handler(self):
        from http.server import BaseHTTPRequestHandler

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the harness counts what happened
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "dropped":
                    self.close_connection = True  # no answer at all: the client sees the connection close
                    return
                if fault is not None:
                    code, name = (503, "SlowDown") if fault == "slowdown" else (500, "InternalError")
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{name}</Code><Message>injected "
                               f"by make faults</Message></Error>").encode()
                    if self.command == "HEAD":  # a HEAD answer has no body, as a store's has not
                        payload = b""
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
