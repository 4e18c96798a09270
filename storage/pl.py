"""The pseudo-label corpus on any fsspec URL: Parquet table, WebDataset shards, rejects and catalog.

Layout under a labels root (docs/architecture.md, "Pseudo-label generation"):

    pl/<lang>/part-<NNNNNN>.parquet       the PL table, one file per work unit
    rejects/<lang>/part-<NNNNNN>.parquet  rows of that unit that were not kept, with the reason
    rejects/<lang>/input-<hash>.parquet   manifest rows rejected before any unit (bad line, dup id)
    shards/pl-<lang>-<NNNNNN>.tar         WebDataset shard of the unit: <key>.flac + <key>.json
    catalog/units/<lang>-<NNNNNN>.json    commit record of the unit (its keys, counts, files)
    catalog/manifests/<hash>.json         the unit numbers given to one input manifest

A unit commits in this order: shard, rejects, PL file (all written under temp names and renamed), then its
catalog record. Readers of the table see a unit once its PL file is in place; a unit without a record is
redone on the next run and its files are replaced under the same names, so no row is ever seen twice.

An id labeled again later (the relabel job after a file or a teacher changed, or a second labeling of the same
ids) supersedes its old row in place: the committing unit rewrites each earlier PL file holding one of its ids
with the new row where the old one was (or without it, when the new attempt was rejected), one atomic file swap
per file, under a lock per file. So every reader of the folder — pandas, pyarrow, duckdb, polars, Hugging Face
`datasets`, Spark — sees each id exactly once at every instant, with its old PL or its new one. The row's
`shard`/`key` name the new shard whatever file holds it.

The folders are plain, not hive `language=<lang>` partitions: `language` is a string column inside every file,
and a column that is also a hive partition reads as a dictionary in pandas and as a string in
`pyarrow.dataset(partitioning="hive")`, which then refuses to merge the two; Hugging Face `datasets` ignores
partitions, so the column must be in the files. Filters on `language` still skip other files (row-group
statistics). Roots written before schema 3 (hive folders, dictionary column) are moved to this layout by the
first labeling run into them (`LabelStore.upgrade_layout`); mlpl's own readers read both.
Every file carries the full schema (pandas drops columns missing from the first file it reads).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import webdataset as wds

from storage.files import (
    AtomicWriter,
    StorageLock,
    atomic_write_bytes,
    close_quietly,
    exists,
    filesystem,
    join,
    list_files,
    read_json,
    remove,
    with_protocol,
    write_json,
)

SCHEMA_VERSION = 3  # 2: audio_etag (files of version 1 read it as null); 3: plain folders, language a string
_LANG = pa.string()
_TIME = pa.timestamp("us", tz="UTC")

PL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("language", _LANG),
        ("audio", pa.string()),
        ("duration_s", pa.float64()),
        ("text", pa.string()),
        ("num_tokens", pa.int32()),
        ("confidence", pa.float32()),  # mean over frames of the top CTC posterior; compared as stored (below)
        ("lid_pred", pa.string()),
        ("lid_prob", pa.float32()),
        ("blank_ratio", pa.float32()),
        ("teacher", pa.string()),  # "<stage>@<step>:<sha256 prefix>" of the teacher checkpoint
        ("decode", pa.string()),  # hash of the decode and filter config
        ("created_at", _TIME),
        ("shard", pa.string()),  # shard path relative to the labels root
        ("key", pa.string()),  # sample key inside the shard
        ("audio_etag", pa.string()),  # size or ETag of the audio file when known (relabel); null before v2
    ],
    metadata={"mlpl.table": "pseudo_labels", "mlpl.schema_version": str(SCHEMA_VERSION)},
)



# The one rule for every confidence comparison (labeling's filters, per-language thresholds, the dev audit's
# buckets, read-time filters, exporters, the student's read): the row's confidence and the threshold are both taken
# as this float32 column stores them, as pandas, polars and duckdb compare a float32 column with a number. A
# threshold read off the table (`df.confidence.min()`, an audit bucket edge) then keeps exactly the rows the table
# shows at or above it, whatever the CPU's rounding of the float64 value the model computed.
def stored_confidence(value: float) -> float:
    """A confidence as the PL table stores it (rounded to float32), as a Python float."""
    return float(np.float32(value))


def confidence_passes(value: float, threshold: float) -> bool:
    """Whether a confidence is at or above `threshold`, both as the PL table stores them."""
    return stored_confidence(value) >= stored_confidence(threshold)


PL_REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("language", _LANG),
        ("audio", pa.string()),
        ("duration_s", pa.float64()),
        ("reason", pa.string()),  # full sentence with the numbers
        ("category", pa.string()),  # short stable name for grouping (e.g. "low_confidence", "missing_file")
        ("text", pa.string()),  # the dropped PL, for filter rejects
        ("num_tokens", pa.int32()),
        ("confidence", pa.float32()),
        ("lid_pred", pa.string()),
        ("lid_prob", pa.float32()),
        ("blank_ratio", pa.float32()),
        ("teacher", pa.string()),
        ("decode", pa.string()),
        ("created_at", _TIME),
        ("source", pa.string()),
        ("audio_etag", pa.string()),
    ],
    metadata={"mlpl.table": "pseudo_label_rejects", "mlpl.schema_version": str(SCHEMA_VERSION)},
)

# Row groups of at most this many rows: small enough that a filtered read skips most of a big unit.
_ROW_GROUP_ROWS = 50_000
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def sample_key(uid: str) -> str:
    """A WebDataset key for an utterance id: the id itself when it is safe, else a sanitized id + its hash.

    WebDataset splits a file name at its first dot into key and extension, so keys hold no dots or slashes.
    """
    if _SAFE_KEY.match(uid):
        return uid
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", uid).strip("_")[:80]
    return f"{safe}-{hashlib.sha1(uid.encode('utf-8')).hexdigest()[:10]}"


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return filesystem(url)


def _table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)


def _write_or_remove(url: str, rows: Sequence[dict[str, Any]], schema: pa.Schema) -> None:
    """Write rows as a Parquet file; with no rows, remove the file instead (Hugging Face `datasets` cannot read
    a Parquet file without row groups)."""
    if rows:
        atomic_write_bytes(url, _parquet_bytes(_table(rows, schema)))
    elif exists(url):
        remove(url)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table read from any earlier schema version in `schema`: missing columns null, types cast."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _read_conformed(fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema) -> pa.Table:
    """A Parquet file of the table, in the current schema whatever version wrote it."""
    with fs.open(path, "rb") as f:
        return _conform(pq.read_table(f), schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=_ROW_GROUP_ROWS)
    return buf.getvalue()


class ShardWriter:
    """One WebDataset tar written under a temp name in the shard folder and renamed by `commit()`.

    Samples stream to the file as they come, so a unit's audio is never held in memory at once.
    """

    def __init__(self, url: str):
        self.url = url
        self._out = AtomicWriter(url)
        self._writer = wds.TarWriter(self._out.file, encoder=False)  # we hand it bytes
        self.count = 0
        self.bytes = 0

    def write(self, key: str, flac: bytes, meta: dict[str, Any]) -> None:
        """Add `<key>.flac` and `<key>.json`."""
        payload = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
        self._writer.write({"__key__": key, "flac": flac, "json": payload})
        self.count += 1
        self.bytes += len(flac) + len(payload)

    def commit(self) -> None:
        """Close the tar and rename it to its final name (replacing an older shard of the same unit)."""
        self._writer.close()  # closes the tar stream; the file object is the writer's to close
        self._out.commit()

    def abort(self) -> None:
        """Drop the temp file (an error half-way through the unit)."""
        close_quietly(self._writer)
        self._out.abort()


class LabelStore:
    """Paths, commits and reads of one labels root (any fsspec URL)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    # --- names ------------------------------------------------------------------------------------
    @staticmethod
    def unit_name(language: str, index: int) -> str:
        """Stable name of a work unit: `<lang>-<NNNNNN>`."""
        return f"{language}-{index:06d}"

    def shard_relpath(self, language: str, index: int) -> str:
        """Shard path relative to the root, as recorded in the table's `shard` column."""
        return f"shards/pl-{language}-{index:06d}.tar"

    def pl_url(self, language: str, index: int) -> str:
        """PL table file of a unit."""
        return join(self.root, "pl", language, f"part-{index:06d}.parquet")

    def rejects_url(self, language: str, index: int) -> str:
        """Rejects file of a unit."""
        return join(self.root, "rejects", language, f"part-{index:06d}.parquet")

    def record_url(self, language: str, index: int) -> str:
        """Catalog record of a unit."""
        return join(self.root, "catalog", "units", f"{self.unit_name(language, index)}.json")

    @property
    def relabel_lock_url(self) -> str:
        """The lock file that keeps two relabel runs of this root from numbering units at once."""
        return join(self.root, "catalog", "relabel.lock")

    def relabel_manifest_url(self, name: str) -> str:
        """Where a relabel run keeps the manifest of the files it labels (named by content)."""
        return join(self.root, "catalog", "relabel", f"{name}.jsonl")

    # --- units ------------------------------------------------------------------------------------
    def open_shard(self, language: str, index: int) -> ShardWriter:
        """A shard writer for a unit (temp name until the unit commits); temp files that a killed earlier
        attempt at this unit left behind are removed first."""
        finals = [join(self.root, self.shard_relpath(language, index)), self.pl_url(language, index),
                  self.rejects_url(language, index), self.record_url(language, index)]
        for url in finals:
            fs, path = _fs(url)
            parent, name = posixpath.split(path)
            for tmp in fs.glob(posixpath.join(parent, f".{name}.tmp-*")):
                fs.rm(tmp)
        return ShardWriter(finals[0])

    def record(self, language: str, index: int) -> dict[str, Any] | None:
        """The unit's commit record, or None when it never committed (or the record is unreadable)."""
        url = self.record_url(language, index)
        try:
            return read_json(url)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # a damaged record means: redo the unit
            return None

    def committed_record(self, language: str, index: int, keys: dict[str, str]) -> dict[str, Any] | None:
        """The unit's record when it committed with exactly these keys and its files are all still there (a unit
        whose PL or reject rows are none has no such file)."""
        rec = self.record(language, index)
        if rec is None or rec.get("keys") != keys:
            return None
        files = [join(self.root, self.shard_relpath(language, index))]
        files += [self.pl_url(language, index)] if rec.get("pl_rows", 1) else []
        files += [self.rejects_url(language, index)] if rec.get("reject_rows", 1) else []
        return rec if all(exists(f) for f in files) else None

    def commit_unit(
        self,
        language: str,
        index: int,
        *,
        shard: ShardWriter,
        rows: Sequence[dict[str, Any]],
        rejects: Sequence[dict[str, Any]],
        record: dict[str, Any],
        supersede: bool = True,
    ) -> None:
        """Make a unit visible: shard, rejects, its ids' earlier PL rows superseded in place, its PL file, then
        the catalog record (each file atomically). `supersede=False` (none of the unit's ids had a row when the
        run was planned) skips looking for earlier rows."""
        lang = {"language": language}
        shard.commit()
        _write_or_remove(self.rejects_url(language, index), [r | lang for r in rejects], PL_REJECT_SCHEMA)
        new_rows = [r | lang for r in rows]
        placed, superseded = (self._supersede(self.pl_url(language, index), new_rows, {r["id"] for r in rejects})
                              if supersede else (set(), {}))
        own = [r for r in new_rows if r["id"] not in placed]
        _write_or_remove(self.pl_url(language, index), own, PL_SCHEMA)
        write_json(self.record_url(language, index), record | {"pl_rows": len(own), "reject_rows": len(rejects)}
                   | ({"superseded": superseded} if superseded else {}))

    def ids_with_rows(self, ids: Iterable[str]) -> set[str]:
        """Which of these ids already have a row in the PL table (one scan of its id column)."""
        wanted = sorted(set(ids))
        dataset = _dataset(self.root, "pl", PL_SCHEMA) if wanted else None
        if dataset is None:
            return set()
        return set(dataset.to_table(columns=["id"], filter=ds.field("id").isin(wanted)).column("id").to_pylist())

    def _supersede(self, own_url: str, new_rows: Sequence[dict[str, Any]],
                   rejected_ids: set[str]) -> tuple[set[str], dict[str, Any]]:
        """Replace the earlier PL rows of these ids in the files that hold them (a rejected new attempt removes
        the old row); return the ids whose new row now sits in an earlier file, and what changed where.

        A new row takes its old row's place only when the language is the same (a file's folder names its
        language); otherwise the old row is removed and the new one goes to the unit's own file."""
        by_id = {r["id"]: r for r in new_rows}
        ids = set(by_id) | rejected_ids
        dataset = _dataset(self.root, "pl", PL_SCHEMA)
        if not ids or dataset is None:
            return set(), {}
        _, own_path = _fs(own_url)
        wanted = ds.field("id").isin(sorted(ids))
        holders = [f.path for f in dataset.get_fragments()
                   if f.path != own_path and f.to_table(columns=["id"], filter=wanted).num_rows]
        placed: set[str] = set()
        changed: dict[str, Any] = {"replaced": 0, "removed": 0, "files": []}
        fs, root_path = _fs(self.root)
        for path in holders:
            relpath = posixpath.relpath(path, root_path)
            # Units labeled in parallel (Dask) may supersede rows of the same earlier file.
            with StorageLock(join(self.root, "catalog", "locks", relpath.replace("/", "_") + ".lock"), wait_s=600):
                old = _read_conformed(fs, path, PL_SCHEMA).to_pylist()
                out = []
                for row in old:
                    new = by_id.get(row["id"])
                    if row["id"] not in ids:
                        out.append(row)
                    elif new is not None and row["id"] not in placed and new["language"] == row["language"]:
                        out.append(new)
                        placed.add(row["id"])
                        changed["replaced"] += 1
                    else:
                        changed["removed"] += 1
                _write_or_remove(with_protocol(path, self.root), out, PL_SCHEMA)
                self._count_rows(relpath, len(out))
            changed["files"].append(relpath)
        return placed, changed

    def _count_rows(self, relpath: str, rows: int) -> None:
        """Set `pl_rows` in the record of the unit whose PL file is `relpath` (pl/<lang>/part-<N>.parquet), so
        that a file superseded down to no rows, and so removed, still counts as committed."""
        m = re.match(r"pl/(?:language=)?([^/]+)/part-(\d+)\.parquet$", relpath)
        rec = None if m is None else self.record(m.group(1), int(m.group(2)))
        if rec is not None and rec.get("pl_rows") != rows:
            write_json(self.record_url(m.group(1), int(m.group(2))), rec | {"pl_rows": rows})

    def upgrade_layout(self) -> int:
        """Move the files of a root written before schema 3 (hive `language=<lang>/` folders, a dictionary
        `language` column) to plain `<lang>/` folders with a string column; returns how many files moved.

        Each file is written at its new name before the old one is removed: a plain reader of the folder may
        see that one file twice for that instant (mlpl's readers never do: they read committed names only)."""
        moved = 0
        for table, schema in (("pl", PL_SCHEMA), ("rejects", PL_REJECT_SCHEMA)):
            for url in list_files(join(self.root, table), "language=*/*.parquet"):
                folder, name = url.rsplit("/", 2)[-2:]
                target = join(self.root, table, folder.removeprefix("language="), name)
                fs, path = _fs(url)
                atomic_write_bytes(target, _parquet_bytes(_read_conformed(fs, path, schema)))
                fs.rm(path)
                moved += 1
        return moved

    def records(self) -> list[dict[str, Any]]:
        """Every unit's commit record, sorted by language and unit number."""
        out = []
        for url in list_files(join(self.root, "catalog", "units"), "*.json"):
            try:
                out.append(read_json(url))
            except (ValueError, UnicodeDecodeError):
                continue
        return sorted(out, key=lambda r: (r["language"], r["unit"]))

    # --- manifests --------------------------------------------------------------------------------
    def manifest_record(self, manifest_sha256: str) -> dict[str, Any] | None:
        """Unit numbers given to a manifest earlier, or None."""
        url = join(self.root, "catalog", "manifests", f"{manifest_sha256[:16]}.json")
        return read_json(url) if exists(url) else None

    def register_manifest(self, manifest_sha256: str, record: dict[str, Any],
                          input_rejects: dict[str, list[dict[str, Any]]]) -> None:
        """Record a manifest's unit numbers and write its input rejects (once per manifest)."""
        for language, rows in sorted(input_rejects.items()):
            url = join(self.root, "rejects", language, f"input-{manifest_sha256[:16]}.parquet")
            atomic_write_bytes(url, _parquet_bytes(_table([r | {"language": language} for r in rows],
                                                          PL_REJECT_SCHEMA)))
        write_json(join(self.root, "catalog", "manifests", f"{manifest_sha256[:16]}.json"), record)

    def next_unit_numbers(self) -> dict[str, int]:
        """Per language, the first unit number no registered manifest uses."""
        nxt: dict[str, int] = {}
        for url in list_files(join(self.root, "catalog", "manifests"), "*.json"):
            for language, (first, count) in read_json(url)["units"].items():
                nxt[language] = max(nxt.get(language, 0), first + count)
        return nxt


def _dataset(root: str, table: str, schema: pa.Schema, files: Iterable[str] | None = None) -> ds.Dataset | None:
    fs, path = _fs(root)
    if files is None:
        base = posixpath.join(path, table)
        if not fs.exists(base):
            return None
        paths = [p for p in fs.glob(posixpath.join(base, "*", "*.parquet"))
                 if not posixpath.basename(p).startswith(".")]
    else:
        paths = [_fs(f)[1] for f in files]
    if not paths:
        return None
    return ds.dataset(sorted(paths), schema=schema, format="parquet", filesystem=fs)


@dataclass(frozen=True)
class PLQuery:
    """Which committed PL rows a reader takes: the read-time filter (one PL corpus serves students with different
    thresholds), the one spelling of it that the table reader, the exporters, the student and the CLI share.

    `teacher` matches the `teacher` column exactly, its "<stage>@<step>" part, or a sha256 prefix;
    `lid_agreement` keeps rows whose LID prediction is their declared language. Confidence compares as stored
    (float32: `confidence_passes`)."""

    languages: tuple[str, ...] | None = None
    min_confidence: float | None = None
    teacher: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    lid_agreement: bool = False

    def __post_init__(self) -> None:
        if self.languages is not None:  # a list or any sequence given: kept hashable and comparable
            object.__setattr__(self, "languages", tuple(self.languages))

    def given(self) -> dict[str, Any]:
        """The filters that select anything (what a message or a record names)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None and v is not False}

    def expression(self):
        """The filters Arrow applies while reading (teacher and LID agreement are applied to the frame)."""
        expr = None
        for e in (None if self.languages is None else ds.field("language").isin(list(self.languages)),
                  # arrow alone would compare in float64: the threshold is rounded as the column stores it
                  None if self.min_confidence is None else ds.field("confidence") >= pa.scalar(
                      stored_confidence(self.min_confidence), pa.float32()),
                  None if self.min_tokens is None else ds.field("num_tokens") >= self.min_tokens,
                  None if self.max_tokens is None else ds.field("num_tokens") <= self.max_tokens):
            if e is not None:
                expr = e if expr is None else expr & e
        return expr

    def keep(self, df):
        """The rows of a read frame that pass the teacher and LID-agreement filters."""
        if self.lid_agreement:
            df = df[df["lid_pred"] == df["language"].astype(str)]
        if self.teacher is not None:
            ident = df["teacher"].str.split(":", n=1).str[0]
            sha = df["teacher"].str.split(":", n=1).str[1]
            df = df[(df["teacher"] == self.teacher) | (ident == self.teacher)
                    | sha.str.startswith(self.teacher.lower())]
        return df


def load_pseudo_labels(root: str, query: PLQuery | None = None, *, columns: Sequence[str] | None = None):
    """The committed PL rows under a labels root as a pandas DataFrame, those `query` selects (all by default)."""
    query = query or PLQuery()
    store = LabelStore(root)
    committed = _committed_parts(store)
    # Committed units whose file is there (one listing, not a request per unit).
    files = _committed_files(root, "pl", "*/*.parquet", committed)
    dataset = _dataset(root, "pl", PL_SCHEMA, files)
    if dataset is None:
        return PL_SCHEMA.empty_table().to_pandas()
    wanted = list(columns) if columns else None
    extra = ["id", "created_at"] + (["teacher"] if query.teacher is not None else []) + (
        ["lid_pred", "language"] if query.lid_agreement else [])
    for needed in extra:
        if wanted and needed not in wanted:
            wanted.append(needed)
    df = dataset.to_table(filter=query.expression(), columns=wanted).to_pandas()
    df = query.keep(_latest_attempts(df, dataset, root, committed))
    if columns:
        df = df[list(columns)]
    return df.reset_index(drop=True)


def _committed_parts(store: LabelStore) -> set[str]:
    """`<lang>/part-<NNNNNN>.parquet` of every unit with a commit record (and the name before schema 3,
    `language=<lang>/…`, for roots not yet upgraded)."""
    return {f"{prefix}{r['language']}/part-{r['unit']:06d}.parquet" for r in store.records()
            for prefix in ("", "language=")}


def _committed_files(root: str, table: str, pattern: str, committed: set[str]) -> list[str]:
    return [f for f in list_files(join(root, table), pattern) if "/".join(f.rsplit("/", 2)[-2:]) in committed]


def _attempts(root: str, committed: set[str], columns: list[str], pl: ds.Dataset | None = None):
    """Every labeling attempt under a root (committed PL rows and unit rejects) with `columns`, and `kept`."""
    import pandas as pd

    parts = []
    pl = pl or _dataset(root, "pl", PL_SCHEMA, _committed_files(root, "pl", "*/*.parquet", committed))
    if pl is not None:
        parts.append(pl.to_table(columns=columns).to_pandas().assign(kept=True))
    reject_files = _committed_files(root, "rejects", "*/part-*.parquet", committed)
    if reject_files:
        rejects = _dataset(root, "rejects", PL_REJECT_SCHEMA, reject_files)
        parts.append(rejects.to_table(columns=columns).to_pandas().assign(kept=False))
    if not parts:
        return pd.DataFrame({c: [] for c in [*columns, "kept"]})
    return pd.concat(parts, ignore_index=True)


def latest_attempts(root: str):
    """Per id, its latest labeling attempt under a labels root: audio, audio_etag, teacher, created_at and
    whether it was kept (a PL row) or rejected — what the relabel job anti-joins new audio against."""
    committed = _committed_parts(LabelStore(root))
    every = _attempts(root, committed, ["id", "language", "audio", "audio_etag", "teacher", "created_at"])
    every["language"] = every["language"].astype(str)
    every = every.sort_values("created_at", kind="stable", na_position="first")
    return every.drop_duplicates("id", keep="last").reset_index(drop=True)


def _latest_attempts(df, dataset: ds.Dataset, root: str, committed: set[str]):
    """The rows of `df` that are their id's latest labeling attempt (PL rows and committed unit rejects of
    the whole root count, before any read-time filter: an old row never stands in for a newer reject)."""
    every = _attempts(root, committed, ["id", "created_at"], pl=dataset)
    if not every["id"].duplicated().any():
        return df  # each id labeled once: nothing superseded
    latest = every.groupby("id")["created_at"].max()
    df = df[df["created_at"] == df["id"].map(latest)]
    return df.sort_values("created_at", kind="stable").drop_duplicates("id", keep="last").sort_index()


def load_rejects(root: str):
    """Every reject row under a labels root (input rows and per-unit rows) as a pandas DataFrame."""
    dataset = _dataset(root, "rejects", PL_REJECT_SCHEMA)
    return PL_REJECT_SCHEMA.empty_table().to_pandas() if dataset is None else dataset.to_table().to_pandas()


def read_shard_sample(root: str, shard: str, key: str) -> tuple[bytes, dict[str, Any]]:
    """The FLAC bytes and JSON record of one sample of a shard (shard path relative to the root), streamed.

    Raises:
        KeyError: when the shard holds no such key.
    """
    for _, flac, meta in iter_shard_samples(root, shard, [key]):
        return flac, meta
    raise KeyError(f"no sample {key!r} in {join(root, shard)}")


def pl_audio(root: str, row: Any) -> bytes:
    """The 16 kHz mono FLAC behind one PL row (a DataFrame row or dict), read from its shard."""
    return read_shard_sample(root, row["shard"], row["key"])[0]


def iter_shard_samples(root: str, shard: str, keys: Iterable[str] | None = None):
    """Stream (key, FLAC bytes, JSON record) of one shard in file order, only `keys` when given.

    The tar is read as a stream through fsspec (one member at a time), so memory holds one sample whatever the
    shard's size, and any fsspec URL works.
    """
    wanted = None if keys is None else set(keys)
    fs, path = _fs(join(root, shard))
    pending: dict[str, dict[str, bytes]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if not member.isfile() or (wanted is not None and key not in wanted):
                continue
            parts = pending.setdefault(key, {})
            parts[ext] = tar.extractfile(member).read()
            if "flac" in parts and "json" in parts:
                del pending[key]
                yield key, parts["flac"], json.loads(parts["json"])
