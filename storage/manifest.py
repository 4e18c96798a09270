"""Utterance manifests and reject tables as JSONL or Parquet on any fsspec URL (docs/architecture.md, "Data model").

Reading never raises on one bad line: a line that is not UTF-8 or not a JSON object becomes a reject
with its line number and the reason, and the other lines are returned.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import AtomicWriter, atomic_write_bytes, read_bytes, resolve_relative


def _is_parquet(url: str) -> bool:
    return url.endswith(".parquet")


def read_manifest(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read manifest rows; return (rows, rejects) where rejects name the line and the reason. A relative
    `audio` path is resolved against the manifest's own folder (absolute paths and URLs stay as they are), so
    a folder of manifests and audio can be moved or uploaded whole.

    Raises:
        FileNotFoundError: when the manifest itself is missing.
    """
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {url}") from None
    if _is_parquet(url):
        table = pq.read_table(io.BytesIO(data))
        return [_resolved(row, url) for row in table.to_pylist()], []
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    # A UTF-8 byte-order mark (Windows tools write one) is not part of the first row.
    data = data.removeprefix(b"\xef\xbb\xbf")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            rejects.append(_line_reject(url, lineno, f"line is not valid UTF-8 ({err.reason} at byte {err.start})"))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rejects.append(_line_reject(url, lineno, f"line is not valid JSON ({err.msg})"))
            continue
        if not isinstance(row, dict):
            rejects.append(_line_reject(url, lineno, "line is not a JSON object"))
            continue
        rows.append(_resolved(row, url))
    return rows, rejects


def manifest_has_rows(url: str) -> bool:
    """Whether a manifest exists and holds at least one row or line (an optional test set may be absent or empty)."""
    try:
        rows, rejects = read_manifest(url)
    except FileNotFoundError:
        return False
    return bool(rows or rejects)


def _resolved(row: dict[str, Any], url: str) -> dict[str, Any]:
    audio = row.get("audio")
    return row | {"audio": resolve_relative(audio, url)} if isinstance(audio, str) and audio else row


def _line_reject(url: str, lineno: int, reason: str) -> dict[str, Any]:
    return {"id": f"{url}:{lineno}", "audio": None, "language": None, "reason": reason}


def write_manifest(url: str, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL (UTF-8, one object a line) or Parquet, chosen by the URL's extension."""
    if _is_parquet(url):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        atomic_write_bytes(url, buf.getvalue())
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(url, text.encode("utf-8"))


REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("audio", pa.string()),
        ("language", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
    ]
)


def write_rejects(url: str, rejects: list[dict[str, Any]]) -> None:
    """Write the rejects table (id, audio, language, reason, source) as Parquet or JSONL."""
    rows = [{k: (None if r.get(k) is None else str(r.get(k))) for k in REJECT_SCHEMA.names} for r in rejects]
    if _is_parquet(url):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), buf)
        atomic_write_bytes(url, buf.getvalue())
    else:
        write_manifest(url, rows)


class ManifestWriter:
    """A JSONL manifest written row by row (a corpus never held in memory) and made visible whole by `commit()`."""

    def __init__(self, url: str):
        self.url = url
        self.rows = 0
        self._out = AtomicWriter(url)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row."""
        self._out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.rows += 1

    def commit(self) -> None:
        """Make the manifest visible under its name."""
        self._out.commit()

    def abort(self) -> None:
        """Drop the rows written so far."""
        self._out.abort()
