"""`mlpl import <format> SRC --out DIR`: another layout's corpus as mlpl manifests, streamed.

The format readers (`storage/importers/`) map a source's splits and columns onto manifest rows; what is the same
for every format happens here, once: language codes, empty transcripts, duplicate ids, the audio header probe
(missing, corrupt or empty audio; the duration when the source has none; a stretch past its file's end) and the
writes. The output is a corpus folder like `mlpl corpus build` makes (`manifests/<split>.jsonl`), so the recipe
takes it as `--corpus-dir`; rows that cannot be used go to `manifests/rejects.jsonl` with the reason, and
`import.json` says what came from where. Audio stays where it is (Hugging Face Parquet, which embeds it, is
the exception: its clips are written once under `audio/`).

Memory stays flat over any corpus size: rows stream from the reader to the manifest files, and the ids seen so
far (to reject duplicates) live in an on-disk SQLite table, not a Python set.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import langcodes

from pipeline.config import normalize_language
from pipeline.data.audio import AudioError, probe_audio, with_span
from pipeline.data.tokenizer import prepare_text
from pipeline.layout import split_manifest
from storage.files import join, write_json
from storage.importers import SPLITS, SourceLayoutError, SourceRow
from storage.manifest import ManifestWriter

log = logging.getLogger("mlpl.import")

ProgressFn = Callable[[int, int, str], None]

FORMATS = ("common-voice", "voxpopuli", "lhotse", "nemo", "nemo-tarred", "hf")


def _reader(fmt: str) -> Callable[..., Iterator[SourceRow]]:
    """The format's reader (imported on use: lhotse and datasets are heavy)."""
    if fmt == "common-voice":
        from storage.importers.common_voice import read
    elif fmt == "voxpopuli":
        from storage.importers.voxpopuli import read
    elif fmt == "lhotse":
        from storage.importers.lhotse_manifests import read
    elif fmt == "nemo":
        from storage.importers.nemo import read
    elif fmt == "nemo-tarred":
        from storage.importers.nemo import read_tarred as read
    elif fmt == "hf":
        from storage.importers.huggingface import read
    else:
        raise ValueError(f"unknown import format {fmt!r} (known: {', '.join(FORMATS)})")
    return read


def rejects_manifest(out_dir: str) -> str:
    """Where an import writes the rows it could not use, with the reason."""
    return join(out_dir, "manifests", "rejects.jsonl")


class _SeenIds:
    """The ids imported so far, on disk (SQLite), so a corpus of millions of clips keeps memory flat."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="mlpl-import-ids-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, split TEXT)")

    def first_split(self, uid: str, split: str) -> str | None:
        """Record `uid`; the split it was first seen in when it is a duplicate, else None."""
        try:
            self.db.execute("INSERT INTO ids VALUES (?, ?)", (uid, split))
            return None
        except sqlite3.IntegrityError:
            return self.db.execute("SELECT split FROM ids WHERE id = ?", (uid,)).fetchone()[0]

    def close(self) -> None:
        """Drop the table."""
        self.db.close()
        os.remove(self.path)


@dataclass
class _Tally:
    """What an import counted: rows read, clips and seconds per (split, language), rejects per reason, rows of
    languages not asked for."""

    read: int = 0
    clips: Counter[tuple[str, str]] = field(default_factory=Counter)
    seconds: Counter[tuple[str, str]] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, split: str, row: dict[str, Any]) -> None:
        """Count one kept row."""
        self.clips[(split, row["language"])] += 1
        self.seconds[(split, row["language"])] += row.get("duration_s") or 0.0

    def summary(self, rejects: int) -> dict[str, Any]:
        """The counts as the import.json fields."""
        splits = {split: {lang: {"clips": n, "hours": round(self.seconds[(split, lang)] / 3600, 4)}
                          for (s, lang), n in sorted(self.clips.items()) if s == split}
                  for split in SPLITS if any(s == split for s, _ in self.clips)}
        return {"rows_read": self.read, "splits": splits,
                "rejects": {"total": rejects, "by_reason": dict(self.reasons.most_common())},
                "skipped_languages": dict(self.skipped)}


def import_corpus(
    fmt: str,
    src: str,
    out_dir: str,
    *,
    languages: Sequence[str] | None = None,
    probe: bool = True,
    options: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Import a source corpus into `out_dir` (manifests per split, rejects, import.json); return the summary.

    `languages` keeps those languages only (rows of others are counted as skipped, not rejected); `probe` reads
    every clip's audio header (off: trust the source's durations, and bad audio is found by the stages);
    `options` go to the format's reader (`split`, `language`, `tars`, `text_column`, `language_column`).

    Raises:
        SourceLayoutError: when `src` does not have the format's layout.
        ValueError: for an unknown format, or an option the format does not take.
    """
    reader = _reader(fmt)
    kwargs = dict(options or {})
    wanted = None if languages is None else {normalize_language(x) or x for x in languages}
    accepted = inspect.signature(reader).parameters
    if wanted is not None and "languages" in accepted:
        kwargs["languages"] = sorted(wanted)
    if "audio_dir" in accepted:
        kwargs["audio_dir"] = join(out_dir, "audio")
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"import format {fmt!r} takes no option {', '.join(unknown)} "
                         f"(it takes: {', '.join(p for p in accepted if p != 'src')})")
    started = time.monotonic()
    writers: dict[str, ManifestWriter] = {}
    rejected = ManifestWriter(rejects_manifest(out_dir))
    seen, tally = _SeenIds(), _Tally()
    try:
        for item in reader(src, **kwargs):
            tally.read += 1
            if on_progress is not None and tally.read % 100 == 0:
                on_progress(tally.read, 0, f"{fmt}: {tally.read} rows read")
            row = _checked(item, seen, wanted, probe, tally.skipped)
            if isinstance(row, str):
                tally.reasons[_reason_kind(row)] += 1
                rejected.write(_reject_row(item.row, row, fmt))
            elif row is not None:
                if item.split not in writers:
                    writers[item.split] = ManifestWriter(split_manifest(out_dir, item.split))
                writers[item.split].write(row)
                tally.add(item.split, row)
    except BaseException:
        for w in [*writers.values(), rejected]:
            w.abort()
        raise
    finally:
        seen.close()
    for w in [*writers.values(), rejected]:
        w.commit()
    summary = {"format": fmt, "source": src, "options": {k: v for k, v in kwargs.items() if k != "audio_dir"},
               "probe": probe, "wall_s": round(time.monotonic() - started, 2), **tally.summary(rejected.rows),
               "manifests": {split: w.url for split, w in writers.items()}}
    write_json(join(out_dir, "import.json"), summary)
    reasons, skipped = tally.reasons, tally.skipped
    log.info("imported %s from %s: %s; %d rejects (%s)%s", fmt, src,
             ", ".join(f"{s} {sum(v['clips'] for v in langs.values())}" for s, langs in summary["splits"].items()),
             rejected.rows, ", ".join(f"{k} {v}" for k, v in reasons.most_common(4)) or "none",
             f"; other languages skipped: {dict(skipped)}" if skipped else "")
    return summary


def _checked(item: SourceRow, seen: _SeenIds, wanted: set[str] | None, probe: bool,
             skipped: Counter[str]) -> dict[str, Any] | str | None:
    """The manifest row of a source row, the reason it is rejected, or None when its language is not wanted."""
    if item.split == "reject":
        return str(item.row.get("reason") or "rejected by the reader")
    if item.split not in SPLITS:
        return f"reader yielded unknown split {item.split!r}"
    src = item.row
    missing = [k for k in ("id", "audio", "language") if src.get(k) in (None, "")]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    spelled = str(src["language"])
    language = normalize_language(spelled)
    if language is None:
        return f"language {spelled!r} is not a language code (expected BCP-47 such as 'es' or 'pt-BR')"
    if not langcodes.tag_is_valid(language):
        return f"unknown locale {spelled!r}: not a language tag of the IANA subtag registry"
    if wanted is not None and language not in wanted:
        skipped[language] += 1
        return None
    text = src.get("text")
    if item.split != "unlabeled":
        if not isinstance(text, str) or not prepare_text(text):
            return "transcript is empty" if isinstance(text, str) or text is None else "transcript is not text"
    uid = str(src["id"])
    first = seen.first_split(uid, item.split)
    if first is not None:
        return f"duplicate id {uid!r} (first in {first})"
    row: dict[str, Any] = {"id": uid, "audio": str(src["audio"]), "language": language}
    try:
        clip = with_span(row["audio"], src.get("start_s"), src.get("end_s"))
    except (TypeError, ValueError) as err:
        return f"start_s/end_s: {err}"
    duration = src.get("duration_s")
    if probe:
        try:
            duration = probe_audio(clip)
        except AudioError as err:
            return str(err)
    if duration is not None:
        try:
            row["duration_s"] = round(float(duration), 3)
        except (TypeError, ValueError):
            return f"duration {duration!r} is not a number"
    if item.split != "unlabeled":
        row["text"] = text
    for key in ("speaker", "start_s", "end_s"):
        if src.get(key) is not None:
            row[key] = src[key]
    return row


def _reject_row(src: dict[str, Any], reason: str, fmt: str) -> dict[str, Any]:
    def s(key: str) -> str | None:
        return None if src.get(key) is None else str(src[key])

    return {"id": s("id"), "audio": s("audio"), "language": s("language"), "reason": reason, "source": fmt}


def _reason_kind(reason: str) -> str:
    """A short name for grouping reasons in the summary (the reason up to its first detail)."""
    for sep in (" (", ": ", " {"):
        reason = reason.split(sep, 1)[0]
    return re.sub(r"'[^']*'", "…", reason).strip()[:60]


__all__ = ["FORMATS", "SourceLayoutError", "import_corpus", "rejects_manifest"]
