"""Other people's corpus layouts read as mlpl manifest rows, streamed (never the whole corpus in memory).

Each format module exposes `read(src, **options) -> Iterator[SourceRow]`. A reader only knows its layout: it
maps the source's own splits onto mlpl's (`labeled`, `dev`, `test`, `unlabeled`) and its columns onto manifest
fields, and yields a `reject` row (with a reason) for a row it cannot map. Everything that is the same for all
formats happens once, in `pipeline/corpus/importing.py`: duplicate ids, language codes, empty text, the audio
header probe (missing or corrupt audio, durations the source lacks) and the manifest writes.

Manifest fields a reader fills (docs/architecture.md, "Data model"): `id`, `audio` (an fsspec URL; audio inside
a tar is `tar://<member>::<tar url>`, read in place), `language` (as the source spells it: the importer
normalizes it), and where the source has them `text`, `duration_s`, `speaker`, and `start_s`/`end_s` for a clip
that is a stretch of a longer recording (every mlpl reader decodes only that stretch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPLITS = ("labeled", "dev", "test", "unlabeled")


class SourceLayoutError(ValueError):
    """The source folder does not have the layout of the format it was imported as (one line: what was expected)."""


@dataclass(frozen=True)
class SourceRow:
    """One row of a source: `split` is one of SPLITS with manifest fields in `row`, or "reject" with
    `row` = {id, audio, language, reason} of a row that cannot be used."""

    split: str
    row: dict[str, Any] = field(default_factory=dict)


def reject(reason: str, *, id: str | None = None, audio: str | None = None,  # noqa: A002 - the manifest's name
           language: str | None = None) -> SourceRow:
    """A reject row of a source, with the reason a person reads."""
    return SourceRow("reject", {"id": id, "audio": audio, "language": language, "reason": reason})


def split_from_name(name: str, default: str | None = None) -> str | None:
    """The mlpl split a source file's name says (train → labeled, dev/valid/validation → dev, test → test,
    unlabeled/unlabelled/untranscribed → unlabeled), else `default`."""
    import re

    tokens = set(re.split(r"[^a-z]+", name.lower()))
    for split, words in (("unlabeled", {"unlabeled", "unlabelled", "untranscribed", "other"}),
                         ("dev", {"dev", "valid", "validation", "val"}), ("test", {"test"}),
                         ("labeled", {"train", "training", "labeled", "labelled"})):
        if tokens & words:
            return split
    return default

