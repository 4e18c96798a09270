"""Mozilla Common Voice releases (`cv-corpus-<version>/<locale>/`) read as mlpl source rows, streamed.

A locale folder holds `clips/*.mp3` and tab-separated lists of them. `train.tsv`, `dev.tsv` and `test.tsv` give
the labeled, dev and test splits; `other.tsv` (clips not yet voted on) gives unlabeled rows, its prompt sentence
unused because nobody checked that the speaker read it. `validated.tsv` is not read: it is a superset of
train/dev/test (every validated clip, with repeats of a sentence the splits leave out), so reading it would
import those clips twice. `invalidated.tsv` is not read: listeners voted those clips wrong.

Columns differ between releases (`locale` and `sentence_id` came late), so they are found by header name.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection, Iterator, Sequence

from storage.files import filesystem, join, open_binary
from storage.importers import SourceLayoutError, SourceRow, reject

TSV_SPLITS = {"train.tsv": "labeled", "dev.tsv": "dev", "test.tsv": "test", "other.tsv": "unlabeled"}


def read(src: str, *, languages: Collection[str] | None = None) -> Iterator[SourceRow]:
    """Rows of a Common Voice locale folder, or of every locale folder in a release folder, streamed.

    Raises:
        SourceLayoutError: when `src` is neither a locale folder nor a folder of them.
    """
    root = absolute_url(src)
    folders = _locale_folders(root)
    if not folders:
        raise SourceLayoutError(f"not a Common Voice folder: expected {root}/clips/ with train.tsv, dev.tsv, "
                                "test.tsv or other.tsv beside it, or locale folders holding them")
    if languages is not None:
        wanted = {language_key(code) for code in languages}
        folders = [(url, files) for url, files in folders if language_key(posixpath.basename(url)) in wanted]
    return _rows(folders)


def _rows(folders: list[tuple[str, set[str]]]) -> Iterator[SourceRow]:
    for folder, files in folders:
        locale = posixpath.basename(folder)
        for name, split in TSV_SPLITS.items():
            if name not in files:
                continue
            url = join(folder, name)
            required = ("path",) if split == "unlabeled" else ("path", "sentence")
            for number, record in read_tsv(url, required):
                if isinstance(record, str):
                    yield reject(record, language=locale)
                    continue
                clip = record["path"]
                if not clip:
                    yield reject(f"{url} line {number}: the path column is empty", language=locale)
                    continue
                row = {"id": posixpath.splitext(posixpath.basename(clip))[0], "audio": join(folder, "clips", clip),
                       "language": record.get("locale") or locale}
                if split != "unlabeled":
                    row["text"] = record["sentence"]
                if record.get("client_id"):
                    row["speaker"] = record["client_id"]
                yield SourceRow(split, row)


def _locale_folders(root: str) -> list[tuple[str, set[str]]]:
    """(URL, file names) of the locale folders at `root`: root itself, or its subfolders."""
    fs, path = filesystem(root)
    try:
        dirs, files = _listing(fs, path)
    except FileNotFoundError:
        return []
    if _is_locale(dirs, files):
        return [(root, files)]
    out = []
    for name in sorted(dirs):
        sub_dirs, sub_files = _listing(fs, posixpath.join(path, name))
        if _is_locale(sub_dirs, sub_files):
            out.append((join(root, name), sub_files))
    return out


def _is_locale(dirs: set[str], files: set[str]) -> bool:
    return "clips" in dirs and bool(files & TSV_SPLITS.keys())


def _listing(fs, path: str) -> tuple[set[str], set[str]]:
    """Names of the (folders, files) in a folder, hidden ones left out."""
    dirs, files = set(), set()
    for info in fs.ls(path, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or info["name"].rstrip("/") == path.rstrip("/"):
            continue
        (dirs if info["type"] == "directory" else files).add(name)
    return dirs, files


def absolute_url(src: str) -> str:
    """A source URL as given (less a trailing '/'), or a local path made absolute."""
    return src.rstrip("/") if "://" in src else os.path.abspath(src)


def language_key(code: str) -> str:
    """A language code compared loosely: case and `_`/`-` ignored (`pt_BR` matches `pt-br`)."""
    return code.strip().lower().replace("_", "-")


def read_tsv(url: str, required: Sequence[str | tuple[str, ...]] = ()) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(line number, {column: value}) for each line of a tab-separated file with a header line, streamed; a line
    that cannot be read comes as (line number, reason) instead. The header is line 1; blank lines are skipped.
    Each `required` item is a column name, or a tuple of names of which one must be present.

    Raises:
        SourceLayoutError: when the header is not UTF-8 or lacks a required column.
    """
    with open_binary(url) as f:
        first = f.readline()
        if not first.strip():
            return  # an empty file lists nothing
        try:
            header = _fields(first.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise SourceLayoutError(f"{url}: the header line is not UTF-8") from None
        wanted = [(item,) if isinstance(item, str) else tuple(item) for item in required]
        if any(not set(names) & set(header) for names in wanted):
            expected = ", ".join(" or ".join(names) for names in wanted)
            raise SourceLayoutError(f"{url} lacks a column: expected a tab-separated header line naming {expected} "
                                    f"(it names {', '.join(header)})")
        for number, raw in enumerate(f, start=2):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, f"{url} line {number} is not UTF-8 (byte {err.start})"
                continue
            values = _fields(line)
            if values == [""]:
                continue
            if len(values) != len(header):
                yield number, f"{url} line {number} has {len(values)} tab-separated fields, its header {len(header)}"
                continue
            yield number, dict(zip(header, values, strict=True))


def _fields(line: str) -> list[str]:
    # Tabs split fields and nothing is quoted (csv.QUOTE_NONE): Common Voice sentences hold unbalanced double
    # quotes, which csv's default quoting would join with the lines after them.
    return line.rstrip("\r\n").split("\t")
