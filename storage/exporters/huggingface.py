"""PL rows as a Hugging Face audio dataset in Parquet, Hub layout: `data/train-<i>-of-<n>.parquet`.

Columns: id, audio (the `Audio(sampling_rate=16000)` feature: {"bytes": the PL shard's FLAC, unchanged,
"path": "<key>.flac"}), text, language, duration_s, confidence, lid_pred, lid_prob, teacher, num_tokens. The
schema carries the `datasets` features under the b"huggingface" metadata key (as `Dataset.to_parquet` writes
it), so `load_dataset("parquet", data_dir=out)` gives the Audio feature back, and the Hub viewer plays the clips.
Rows are written in small row groups with pyarrow's `ParquetWriter`, so memory holds one row group of audio.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.exporters import SAMPLING_RATE, label_fields
from storage.files import AtomicWriter, close_quietly, join, list_files, remove

DATA = "data"
ROW_GROUP_ROWS = 100  # a reader of one row reads its whole group: keep groups of audio small
# The options `datasets` writes Parquet with (content-defined chunking dedupes uploads to the Hub).
_CDC = {"min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0}
_FILE = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.parquet$")


def features():
    """The `datasets.Features` of the export."""
    from datasets import Audio, Features, Value

    return Features({
        "id": Value("string"),
        "audio": Audio(sampling_rate=SAMPLING_RATE),
        "text": Value("string"),
        "language": Value("string"),
        "duration_s": Value("float64"),
        "confidence": Value("float32"),
        "lid_pred": Value("string"),
        "lid_prob": Value("float32"),
        "teacher": Value("string"),
        "num_tokens": Value("int32"),
    })


def file_name(split: str, index: int, count: int) -> str:
    """A Parquet file of the Hub layout, relative to the output folder."""
    return posixpath.join(DATA, f"{split}-{index:05d}-of-{count:05d}.parquet")


class HuggingFaceParquetWriter:
    """Parquet files of at most `max_rows_per_file` rows each, renamed into place at `commit()`.

    The Hub names hold the file count, so the writer is told the number of rows it will get.
    """

    def __init__(self, out_dir: str, *, total_rows: int, split: str = "train", max_rows_per_file: int = 10_000,
                 row_group_rows: int = ROW_GROUP_ROWS):
        if total_rows < 1 or max_rows_per_file < 1:
            raise ValueError(f"total_rows ({total_rows}) and max_rows_per_file ({max_rows_per_file}) must be >= 1")
        self.out_dir, self.split = out_dir, split
        self.total_rows, self.max_rows_per_file, self.row_group_rows = total_rows, max_rows_per_file, row_group_rows
        self.num_files = math.ceil(total_rows / max_rows_per_file)
        feats = features()
        self.schema = feats.arrow_schema  # holds the b"huggingface" metadata
        self._options = _column_options(feats, self.schema)
        self.rows = 0
        self._batch: list[dict[str, Any]] = []
        self._pending: list[AtomicWriter] = []  # closed files, renamed at commit so a failed export leaves none
        self._out: AtomicWriter | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, row: dict[str, Any], flac: bytes) -> None:
        """Add one row (its FLAC bytes as they are)."""
        if self.rows >= self.total_rows:
            raise ValueError(f"more rows than the {self.total_rows} this export was opened for")
        self._batch.append({
            "id": row["id"],
            "audio": {"bytes": flac, "path": f"{row['key']}.flac"},
            "text": row["text"],
            "language": row["language"],
            "duration_s": row["duration_s"],
            **label_fields(row),
        })
        self.rows += 1
        in_file = (self.rows - 1) % self.max_rows_per_file + 1
        if len(self._batch) >= self.row_group_rows or in_file == self.max_rows_per_file:
            self._flush()
        if in_file == self.max_rows_per_file:
            self._close_file()

    def _flush(self) -> None:
        if not self._batch:
            return
        if self._writer is None:
            index = len(self._pending)
            self._out = AtomicWriter(join(self.out_dir, file_name(self.split, index, self.num_files)))
            self._writer = pq.ParquetWriter(self._out.file, self.schema, use_content_defined_chunking=_CDC,
                                            write_page_index=True, **self._options)
        self._writer.write_table(pa.Table.from_pylist(self._batch, schema=self.schema))
        self._batch = []

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.add_key_value_metadata({"content_defined_chunking": json.dumps(_CDC)})
            self._writer.close()
            self._out.file.close()
            self._pending.append(self._out)
            self._writer = self._out = None

    def commit(self) -> dict[str, Any]:
        """Rename the files into place and drop other `<split>-*-of-*.parquet` files (an earlier export's).

        Raises:
            ValueError: when fewer rows came than the writer was opened for (the names would lie).
        """
        self._flush()
        self._close_file()
        if self.rows != self.total_rows:
            self.abort()
            raise ValueError(f"the export was opened for {self.total_rows} rows but got {self.rows}")
        names = [file_name(self.split, i, self.num_files) for i in range(len(self._pending))]
        for out in self._pending:
            out.commit()
        for url in list_files(join(self.out_dir, DATA), "*.parquet"):
            match = _FILE.match(posixpath.basename(url))
            if match and match["split"] == self.split and posixpath.join(DATA, posixpath.basename(url)) not in names:
                remove(url)  # `load_dataset` reads every file of the split: a stale one would add its rows
        return {"files": names}

    def abort(self) -> None:
        """Drop the files written so far."""
        if self._writer is not None:
            close_quietly(self._writer)
            self._pending.append(self._out)
            self._writer = self._out = None
        for out in self._pending:
            out.abort()
        self._pending = []
        self._batch = []


def _column_options(feats, schema: pa.Schema) -> dict[str, Any]:
    """Per-column compression and encodings as `datasets` writes them (audio bytes stored plain, uncompressed)."""
    try:
        from datasets.arrow_writer import get_parquet_column_options
    except ImportError:  # an older `datasets`: pyarrow's defaults read the same
        return {}
    return get_parquet_column_options(feats, schema)
