"""Manifest rows → validated utterances and rejects (docs/architecture.md, "Data model").

Validation happens where a manifest enters, without touching audio: every row is either an `Utterance` or a
`Reject` with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import normalize_language
from pipeline.data.audio import split_span, with_span
from pipeline.data.tokenizer import prepare_text
from storage.files import is_local, relative_to
from storage.manifest import read_manifest, write_manifest

ProgressFn = Callable[[int, int, str], None]  # on_progress(done, total, description) of every long loop


@dataclass(frozen=True)
class Utterance:
    """One manifest row that passed validation (docs/architecture.md, "Data model")."""

    id: str
    audio: str
    duration_s: float
    language: str
    text: str | None = None
    speaker: str | None = None
    etag: str | None = None  # the audio file's size or object-store ETag when known (relabel's change check)


@dataclass(frozen=True)
class Reject:
    """An input row that could not be used, and why."""

    id: str | None
    audio: str | None
    language: str | None
    reason: str
    source: str = ""

    def as_row(self) -> dict[str, Any]:
        """Plain dict for the rejects table."""
        return {"id": self.id, "audio": self.audio, "language": self.language, "reason": self.reason,
                "source": self.source}



def _row_reject(row: dict[str, Any], reason: str, source: str) -> Reject:
    def s(key: str) -> str | None:
        v = row.get(key)
        return None if v is None else str(v)

    return Reject(s("id"), s("audio"), s("language"), reason, source)


def validate_rows(
    rows: list[dict[str, Any]],
    *,
    source: str,
    require_text: bool,
    languages: Sequence[str] | None,
) -> tuple[list[Utterance], list[Reject]]:
    """Check manifest fields (ids, duplicates, language, text) without touching audio."""
    utts: list[Utterance] = []
    rejects: list[Reject] = []
    first_seen: dict[str, int] = {}
    known = {normalize_language(x) or x for x in languages} if languages is not None else None
    for n, row in enumerate(rows, start=1):
        missing = [k for k in ("id", "audio", "language") if row.get(k) in (None, "")]
        if require_text and row.get("text") is None:
            missing.append("text")
        if missing:
            rejects.append(_row_reject(row, f"row {n}: missing field(s) {', '.join(missing)}", source))
            continue
        uid = str(row["id"])
        lang = normalize_language(str(row["language"]))
        if lang is None:
            reason = f"language {row['language']!r} is not a language code (expected BCP-47 such as 'es' or 'pt-BR')"
            rejects.append(_row_reject(row, reason, source))
            continue
        if uid in first_seen:
            rejects.append(_row_reject(row, f"duplicate id {uid!r} (first at row {first_seen[uid]})", source))
            continue
        first_seen[uid] = n
        if known is not None and lang not in known:
            reason = f"unknown language {lang!r} (known: {', '.join(sorted(known))})"
            rejects.append(_row_reject(row, reason, source))
            continue
        text = row.get("text")
        if text is not None:
            if not isinstance(text, str):
                rejects.append(_row_reject(row, f"text is not a string ({type(text).__name__})", source))
                continue
            text = prepare_text(text)
            if require_text and not text:
                rejects.append(_row_reject(row, "text is empty", source))
                continue
        try:
            duration_s = float(row.get("duration_s") or 0.0)
        except (TypeError, ValueError):
            rejects.append(_row_reject(row, f"duration_s is not a number ({row.get('duration_s')!r})", source))
            continue
        try:
            audio = _clip_audio(row)
        except (TypeError, ValueError) as err:
            rejects.append(_row_reject(row, f"start_s/end_s: {err}", source))
            continue
        if audio != str(row["audio"]) and not duration_s:
            _, start, end = split_span(audio)
            duration_s = end - start
        utts.append(
            Utterance(
                id=uid,
                audio=audio,
                duration_s=duration_s,
                language=lang,
                text=text,
                speaker=None if row.get("speaker") is None else str(row["speaker"]),
                etag=None if row.get("etag") is None else str(row["etag"]),
            )
        )
    return utts, rejects


def _clip_audio(row: dict[str, Any]) -> str:
    """The row's audio URL, with the stretch `start_s`/`end_s` of a longer recording as a media fragment."""
    start, end = row.get("start_s"), row.get("end_s")
    if start is None and end is None:
        return str(row["audio"])
    return with_span(str(row["audio"]), None if start is None else float(start), None if end is None else float(end))


def rejects_for_language(rejects: list[Reject], language: str, languages: Sequence[str] | None) -> list[Reject]:
    """The rejects a per-language stage reports: its own language's, and rows no other stage would claim
    (no language, an unknown one); another known language's bad rows belong to that language's stage."""
    others = {normalize_language(x) for x in languages or []} - {language}
    return [r for r in rejects if normalize_language(r.language or "") not in others]


def read_utterances(
    manifest_url: str, *, require_text: bool, languages: Sequence[str] | None, language: str | None = None
) -> tuple[list[Utterance], list[Reject]]:
    """Manifest rows as validated utterances (no audio touched) and rejects; with `language`, that language's.

    Raises:
        FileNotFoundError: when the manifest itself is missing.
    """
    rows, line_rejects = read_manifest(manifest_url)
    rejects = [Reject(r["id"], None, None, r["reason"], manifest_url) for r in line_rejects]
    utts, row_rejects = validate_rows(rows, source=manifest_url, require_text=require_text, languages=languages)
    rejects += row_rejects
    if language is not None:
        utts = [u for u in utts if u.language == language]
        rejects = rejects_for_language(rejects, language, languages)
    return utts, rejects


def labeled_share(rows: list[dict[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """The first ⌈fraction · n⌉ of each language's n rows, in manifest order (the clips a synthetic corpus built
    with that many labeled clips holds), and {language: {"kept", "of"}}. Rows without a usable language stay: the
    stages reject them with the reason."""
    def key(row: dict[str, Any]) -> str | None:
        lang = row.get("language")
        return normalize_language(lang) if isinstance(lang, str) else None

    counts = Counter(k for k in map(key, rows) if k is not None)
    # round(): 150 / 3 in floats may land a hair above 50, and ceil would keep 51.
    keep = {lang: math.ceil(round(fraction * n, 9)) for lang, n in counts.items()}
    seen: Counter[str] = Counter()
    out = []
    for row in rows:
        lang = key(row)
        if lang is None or seen[lang] < keep[lang]:
            out.append(row)
        if lang is not None:
            seen[lang] += 1
    return out, {lang: {"kept": keep[lang], "of": n} for lang, n in sorted(counts.items())}


def write_labeled_share(source_url: str, dest_url: str, fraction: float) -> dict[str, Any]:
    """Write `labeled_share` of a labeled manifest to `dest_url`, its rows still pointing at the source's audio
    (relative where both are local, so the run folder moves with the corpus beside it); what was kept, and the
    source's unreadable lines, which no stage will see."""
    rows, line_rejects = read_manifest(source_url)
    kept, counts = labeled_share(rows, fraction)
    if is_local(dest_url):
        folder = posixpath.dirname(dest_url.removeprefix("file://"))
        kept = [r | {"audio": relative_to(r["audio"], folder)} if isinstance(r.get("audio"), str)
                and is_local(r["audio"]) else r for r in kept]
    write_manifest(dest_url, kept)
    return {"source": source_url, "manifest": dest_url, "fraction": fraction, "languages": counts,
            "unreadable_source_lines": line_rejects}
