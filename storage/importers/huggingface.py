"""Hugging Face audio datasets saved as Parquet read as mlpl rows: `Dataset.to_parquet` files, the Hub layout
`data/<split>-00000-of-00001.parquet`, or `<config>/<split>/*.parquet`.

Each file has an `audio` column (the `Audio` feature: a struct {bytes, path}) and text / language columns. Audio
carried as bytes is written once to `<audio_dir>/<split>/<id><ext>`, so later stages read plain files.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any

from storage import files
from storage.importers import SourceLayoutError, SourceRow, reject, split_from_name

TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript", "normalized_text")
LANGUAGE_COLUMNS = ("language", "locale", "lang")
ID_COLUMNS = ("id", "utterance_id", "segment_id")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
          (b"\xff\xf3", ".mp3"))


def read(src: str, *, audio_dir: str, split: str | None = None, language: str | None = None,
         text_column: str | None = None, language_column: str | None = None) -> Iterator[SourceRow]:
    """Rows of a Parquet file or of every `*.parquet` below a folder, streamed through `datasets`
    (`load_dataset("parquet", streaming=True)`, audio cast to `Audio(decode=False)`: raw bytes, never decoded).

    Split: `split`, else the file's name or folders below `src` (`split_from_name`), else labeled when the file has
    a text column; a row without text is unlabeled. Id: the `id`/`utterance_id`/`segment_id` column, else the
    stem of the audio's path, else `<split>-<row number in that split>`, made safe for a file name. Audio: bytes are
    written to `<audio_dir>/<split>/<id><ext>` (kept when a file of that size is there: a rerun resumes); a path
    alone is used as it is, relative to the Parquet file's folder.

    Raises:
        SourceLayoutError: when there is no Parquet file, or a file has no `audio` column.
    """
    from datasets import Audio, load_dataset

    written: set[str] = set()  # audio files written in this read: a repeated id must not overwrite the first's
    counters: dict[str, int] = {}
    for url, relpath in _parquet_files(src):
        columns = _columns(url)
        if "audio" not in columns:
            raise SourceLayoutError(f"{url} has no `audio` column (it has {sorted(columns)[:8]}): expected a Hugging "
                                    "Face audio dataset saved as Parquet")
        text_col = _pick(text_column, TEXT_COLUMNS, columns, "text", url)
        lang_col = _pick(language_column, LANGUAGE_COLUMNS, columns, "language", url)
        id_col = next((c for c in ID_COLUMNS if c in columns), None)
        speaker_col = next((c for c in SPEAKER_COLUMNS if c in columns), None)
        file_split = split or _split_of(relpath) or ("labeled" if text_col else "unlabeled")

        dataset = load_dataset("parquet", data_files=[url], split="train", streaming=True)
        if isinstance((dataset.features or {}).get("audio"), Audio):
            dataset = dataset.cast_column("audio", Audio(decode=False))
        for record in dataset:
            number = counters.get(file_split, 0)
            counters[file_split] = number + 1
            audio = record.get("audio")
            data, path = _audio_fields(audio)
            uid = _safe_id(_id_value(record, id_col, path) or f"{file_split}-{number}")
            lang = (record.get(lang_col) if lang_col else None) or language
            text = record.get(text_col) if text_col else None
            row_split = file_split if text is not None else "unlabeled"
            if not lang:
                yield reject(f"no language: the row has no {_column_names(language_column, LANGUAGE_COLUMNS)} value "
                             "and --language was not given", id=uid, audio=path)
                continue
            if data:
                target = files.join(audio_dir, row_split, uid + _extension(path, data))
                if target in written:
                    yield reject(f"duplicate id {uid!r} in {url}: its audio would overwrite an earlier row's",
                                 id=uid, audio=path, language=lang)
                    continue
                _write_once(target, data)
                written.add(target)
                audio_url = target
            elif path:
                audio_url = files.resolve_relative(path, url)
            else:
                yield reject(f"no audio: the row's `audio` has neither bytes nor a path ({url})", id=uid,
                             language=lang)
                continue
            row: dict[str, Any] = {"id": uid, "audio": audio_url, "language": lang}
            if text is not None:
                row["text"] = text
            if speaker_col and record.get(speaker_col) is not None:
                row["speaker"] = str(record[speaker_col])
            yield SourceRow(row_split, row)


def _parquet_files(src: str) -> list[tuple[str, str]]:
    """(URL, path below `src`) of every Parquet file of `src`, sorted."""
    fs, path = files.filesystem(src)
    if fs.isfile(path):
        return [(src, posixpath.basename(path))]
    if fs.isdir(path):
        found = files.file_listing(src, (".parquet",))
        if found:
            return [(f["url"], f["relpath"]) for f in found]
    raise SourceLayoutError(f"no Parquet files at {src}: expected a Hugging Face dataset saved as Parquet "
                            "(data/<split>-00000-of-00001.parquet or <config>/<split>/*.parquet)")


def _columns(url: str) -> list[str]:
    """Column names of a Parquet file, read from its footer."""
    import pyarrow.parquet as pq

    with files.open_binary(url) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _pick(given: str | None, candidates: tuple[str, ...], columns: list[str], what: str, url: str) -> str | None:
    """The column to read `what` from: the one given (which must exist), else the first candidate present."""
    if given:
        if given not in columns:
            raise SourceLayoutError(f"{url} has no {what} column {given!r} (it has {sorted(columns)[:8]})")
        return given
    return next((c for c in candidates if c in columns), None)


def _column_names(given: str | None, candidates: tuple[str, ...]) -> str:
    return f"`{given}`" if given else "/".join(f"`{c}`" for c in candidates)


def _split_of(relpath: str) -> str | None:
    """The split a file's name says, else its nearest folder's (only the part below the dataset's root)."""
    parts = relpath.split("/")
    for part in reversed(parts):
        found = split_from_name(part.removesuffix(".parquet"))
        if found:
            return found
    return None


def _audio_fields(audio: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an `audio` value: the Audio struct, or a plain path string."""
    if isinstance(audio, dict):
        return audio.get("bytes") or None, audio.get("path") or None
    if isinstance(audio, str):
        return None, audio or None
    return None, None


def _id_value(record: dict[str, Any], id_col: str | None, path: str | None) -> str | None:
    value = record.get(id_col) if id_col else None
    if value is not None and str(value).strip():
        return str(value)
    if path:
        return posixpath.splitext(posixpath.basename(path))[0] or None
    return None


def _safe_id(value: str) -> str:
    """An id usable as a file name: characters other than letters, digits, `.`, `_`, `-` become `_`."""
    safe = re.sub(r"[^\w.-]", "_", value.strip(), flags=re.ASCII).lstrip(".")
    return safe or "_"


def _extension(path: str | None, data: bytes) -> str:
    """The audio file's extension: from its path in the struct, else from its first bytes ("" when unknown)."""
    ext = posixpath.splitext(path or "")[1].lower()
    if re.fullmatch(r"\.[a-z0-9]{2,5}", ext):
        return ext
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), "")


def _write_once(url: str, data: bytes) -> None:
    """Write `data` unless a file of its size is already there (written by an earlier, maybe killed, read)."""
    fs, path = files.filesystem(url)
    if fs.exists(path) and fs.size(path) == len(data):
        return
    files.atomic_write_bytes(url, data)
