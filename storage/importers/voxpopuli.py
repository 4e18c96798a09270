"""VoxPopuli releases (facebookresearch/voxpopuli) read as mlpl source rows, streamed.

`transcribed_data/<lang>/asr_{train,dev,test}.tsv` list the transcribed segments (labeled, dev, test), whose
audio is `transcribed_data/<lang>/<year>/<id>.ogg` with the year the id's first four characters;
`unlabelled_data/<lang>/<year>/*.ogg` are the unlabeled segments, found by walking the folders (no list file).
A release may hold either subtree or both. The text is `raw_text` (cased, punctuated), or `normalized_text`
where the raw one is empty.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Iterator

from storage.files import filesystem, join
from storage.importers import SourceLayoutError, SourceRow, reject
from storage.importers.common_voice import absolute_url, language_key, read_tsv

TRANSCRIBED, UNLABELLED = "transcribed_data", "unlabelled_data"
TSV_SPLITS = {"asr_train.tsv": "labeled", "asr_dev.tsv": "dev", "asr_test.tsv": "test"}


def read(src: str, *, languages: Collection[str] | None = None) -> Iterator[SourceRow]:
    """Rows of a VoxPopuli release folder (its transcribed and unlabelled subtrees), streamed.

    Raises:
        SourceLayoutError: when `src` holds neither `transcribed_data/` nor `unlabelled_data/`.
    """
    root = absolute_url(src)
    fs, path = filesystem(root)
    subtrees = [name for name in (TRANSCRIBED, UNLABELLED) if fs.isdir(posixpath.join(path, name))]
    if not subtrees:
        raise SourceLayoutError(f"not a VoxPopuli folder: expected {root}/{TRANSCRIBED}/<lang>/asr_train.tsv "
                                f"(asr_dev.tsv, asr_test.tsv) or {root}/{UNLABELLED}/<lang>/<year>/*.ogg")
    wanted = None if languages is None else {language_key(code) for code in languages}
    return _rows(root, subtrees, wanted)


def _rows(root: str, subtrees: list[str], wanted: set[str] | None) -> Iterator[SourceRow]:
    for subtree in subtrees:
        fs, path = filesystem(join(root, subtree))
        for lang in sorted(_subfolders(fs, path)):
            if wanted is not None and language_key(lang) not in wanted:
                continue
            folder = join(root, subtree, lang)
            yield from _transcribed(folder, lang) if subtree == TRANSCRIBED else _unlabelled(folder, lang)


def _transcribed(folder: str, lang: str) -> Iterator[SourceRow]:
    fs, path = filesystem(folder)
    for name, split in TSV_SPLITS.items():
        if not fs.isfile(posixpath.join(path, name)):
            continue
        url = join(folder, name)
        for number, record in read_tsv(url, ("id", ("raw_text", "normalized_text"))):
            if isinstance(record, str):
                yield reject(record, language=lang)
                continue
            clip = record["id"]
            year = clip[:4]
            if not (len(year) == 4 and year.isdigit()):
                # the audio's folder is the id's year: without one the clip cannot be found
                yield reject(f"{url} line {number}: id {clip!r} does not start with a year (its audio is "
                             f"<lang>/<year>/<id>.ogg)", id=clip or None, language=lang)
                continue
            raw = record.get("raw_text", "")
            row = {"id": clip, "audio": join(folder, year, f"{clip}.ogg"), "language": lang,
                   "text": raw if raw.strip() else record.get("normalized_text", "")}
            if record.get("speaker_id"):
                row["speaker"] = record["speaker_id"]
            yield SourceRow(split, row)


def _unlabelled(folder: str, lang: str) -> Iterator[SourceRow]:
    fs, base = filesystem(folder)
    # walk lists one folder at a time (never the whole language at once); sorted for a stable order
    for path, dirs, files in fs.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = posixpath.relpath(path, base)
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(".ogg"):
                continue
            audio = join(folder, name) if rel == "." else join(folder, rel, name)
            yield SourceRow("unlabeled", {"id": name[: -len(".ogg")], "audio": audio, "language": lang})


def _subfolders(fs, path: str) -> list[str]:
    """Names of the folders in a folder, hidden ones left out."""
    names = []
    for info in fs.ls(path, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info["type"] == "directory" and not name.startswith(".") and info["name"].rstrip("/") != path.rstrip("/"):
            names.append(name)
    return names
