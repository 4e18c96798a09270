"""Lhotse corpora as mlpl source rows: a CutSet manifest, RecordingSet + SupervisionSet pairs, or a Shar folder.

Each supervision is one clip (its id, the recording's file or URL, and `start_s`/`end_s` of its stretch unless it
spans the whole recording); a cut or recording without supervisions is one unlabeled clip. A Shar folder's audio
is read in place from its tars (`tar://<cut id>.<format>::<tar>`, the member `CutSet.to_shar` writes per cut),
with stretches relative to the cut (Shar stores only the cut's audio).

Memory: manifests are read line by line. A RecordingSet + SupervisionSet pair is joined in one streaming pass
when the supervisions follow the recordings' order, grouped by recording (as lhotse recipes write them; one
id-only pass over both files checks this first); otherwise an index of the recordings by id holds each
recording's JSON line (about 0.3 kB per recording, ~300 MB for a million) plus the ids of those used.

Lines are read through `storage.files` (any fsspec URL; lhotse's own lazy readers reach URLs only with
smart_open) and decoded with lhotse's `deserialize_item`, which is what `CutSet.from_jsonl_lazy` does per line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from storage import files
from storage.importers import SPLITS, SourceLayoutError, SourceRow, reject, split_from_name

# Supervision bounds within this distance of the recording's ends count as the ends (lhotse rounds times).
_TOLERANCE_S = 0.01

# Lhotse recipes often spell languages as English names ("German"); common ones map onto ISO 639-1, anything
# else is passed on as spelled and the importer rejects what is not a code, with its reason.
LANGUAGE_CODES = {
    "arabic": "ar", "basque": "eu", "belarusian": "be", "bengali": "bn", "bulgarian": "bg", "catalan": "ca",
    "chinese": "zh", "mandarin": "zh", "cantonese": "yue", "croatian": "hr", "czech": "cs", "danish": "da",
    "dutch": "nl", "english": "en", "estonian": "et", "finnish": "fi", "french": "fr", "galician": "gl",
    "german": "de", "greek": "el", "hebrew": "he", "hindi": "hi", "hungarian": "hu", "indonesian": "id",
    "irish": "ga", "italian": "it", "japanese": "ja", "korean": "ko", "latvian": "lv", "lithuanian": "lt",
    "maltese": "mt", "norwegian": "no", "persian": "fa", "polish": "pl", "portuguese": "pt", "romanian": "ro",
    "russian": "ru", "serbian": "sr", "slovak": "sk", "slovenian": "sl", "slovene": "sl", "spanish": "es",
    "swahili": "sw", "swedish": "sv", "tamil": "ta", "telugu": "te", "thai": "th", "turkish": "tr",
    "ukrainian": "uk", "urdu": "ur", "vietnamese": "vi", "welsh": "cy",
}

_SHAR_CUTS = re.compile(r"^cuts(\.\d+)?\.jsonl\.gz$")
_JSONL = (".jsonl", ".jsonl.gz")
_EXPECTED = ("a lhotse CutSet manifest (*.jsonl.gz), a folder of *recordings*.jsonl.gz + *supervisions*.jsonl.gz "
             "pairs, or a Lhotse Shar folder (cuts.000000.jsonl.gz + recording.000000.tar)")


def read(src: str, *, split: str | None = None, language: str | None = None) -> Iterator[SourceRow]:
    """The clips of a lhotse CutSet manifest, a folder of RecordingSet + SupervisionSet pairs or a Shar folder.

    Raises:
        ImportError: when lhotse is not installed.
        SourceLayoutError: when `src` is none of the three layouts.
        ValueError: when `split` is not one of SPLITS.
    """
    _lhotse()
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    jobs = _layout(src)  # checked now, so a wrong folder fails at the call rather than at the first row
    return _rows(jobs, split, language)


def _lhotse():
    try:
        import lhotse
    except ImportError as err:
        raise ImportError("reading lhotse manifests needs lhotse: pip install lhotse") from err
    return lhotse


def _name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _layout(src: str) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(kind, manifest URLs, split its name says) per manifest to read."""
    fs, path = files.filesystem(src)
    if not fs.exists(path):
        raise SourceLayoutError(f"{src} does not exist; expected {_EXPECTED}")
    if not fs.isdir(path):
        if not src.endswith(_JSONL):
            raise SourceLayoutError(f"{src} is not {_EXPECTED}")
        first = next(_items(src), None)
        if first is not None and not _is_cut(first):
            raise SourceLayoutError(f"{src} holds {type(first).__name__}s, not cuts: import the folder holding the "
                                    "recordings + supervisions pair, or a CutSet manifest")
        return [("cuts", (_absolute(src),), split_from_name(_name(src)))]
    names = {_name(u): _absolute(u) for u in files.list_files(src, "*")}
    split_of_folder = split_from_name(_name(src))
    shar = sorted(n for n in names if _SHAR_CUTS.match(n))
    if shar:
        jobs = []
        for cuts in shar:
            tar = "recording" + cuts[len("cuts"):-len(".jsonl.gz")] + ".tar"
            if tar not in names:
                raise SourceLayoutError(f"{src}: {cuts} has no {tar} beside it; expected a Lhotse Shar folder written "
                                        'with fields={"recording": ...}')
            jobs.append(("shar", (names[cuts], names[tar]), split_of_folder))
        return jobs
    manifests = sorted(n for n in names if n.endswith(_JSONL))
    recordings = [n for n in manifests if "recordings" in n]
    supervisions = [n for n in manifests if "supervisions" in n]
    if recordings or supervisions:
        partners = {n.replace("recordings", "supervisions"): n for n in recordings}
        for n in sorted(set(partners) ^ set(supervisions)):
            lone = partners.get(n, n)
            raise SourceLayoutError(f"{src}: {lone} has no {'supervisions' if lone in recordings else 'recordings'} "
                                    "manifest of the same name beside it; expected *recordings*/*supervisions* pairs")
        return [("pair", (names[r], names[s]), split_from_name(r, split_of_folder))
                for s, r in sorted(partners.items())]
    cut_manifests = [n for n in manifests if "cuts" in n]
    if cut_manifests:
        return [("cuts", (names[n],), split_from_name(n, split_of_folder)) for n in cut_manifests]
    raise SourceLayoutError(f"{src} holds no lhotse manifests; expected {_EXPECTED}")


def _rows(jobs, split: str | None, language: str | None) -> Iterator[SourceRow]:
    readers = {"cuts": _cut_rows, "pair": _pair_rows, "shar": _shar_rows}
    for kind, urls, split_of_name in jobs:
        yield from readers[kind](*urls, split=split or split_of_name, language=language)


def _lines(url: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a JSONL file, gzipped when its name ends in .gz."""
    with files.open_binary(url) as raw:
        text = gzip.open(raw, "rt", encoding="utf-8") if url.endswith(".gz") else io.TextIOWrapper(raw, "utf-8")
        for number, line in enumerate(text, 1):
            if line.strip():
                yield number, line


def _items(url: str) -> Iterator[Any]:
    """The lhotse objects of a JSONL manifest, one line at a time."""
    from lhotse.serialization import deserialize_item

    for number, line in _lines(url):
        try:
            yield deserialize_item(json.loads(line))
        except (ValueError, TypeError, KeyError, AssertionError) as err:
            raise ValueError(f"{url}, line {number}: not a lhotse manifest item ({err})") from err


def _ids(url: str, key: str) -> Iterator[str]:
    """One field of every line of a JSONL manifest, without building lhotse objects."""
    for _, line in _lines(url):
        yield json.loads(line)[key]


def _is_cut(item: Any) -> bool:
    from lhotse.cut import Cut

    return isinstance(item, Cut)


def language_code(spelling: str | None) -> str | None:
    """ISO 639-1 code of a common English language name ("German" → "de"); anything else as spelled."""
    if spelling is None:
        return None
    return LANGUAGE_CODES.get(spelling.strip().lower(), spelling)


def _audio(recording) -> tuple[str | None, str | None]:
    """(audio URL, None) of a recording read as one file, else (None, reason)."""
    sources = recording.sources
    if len(sources) != 1:
        return None, f"recording {recording.id} has {len(sources)} audio sources (one per channel); mlpl reads one"
    changed = [t["name"] if isinstance(t, dict) else type(t).__name__ for t in recording.transforms or []]
    changed = [name for name in changed if name != "Resample"]  # mlpl resamples every file anyway
    if changed:
        return None, f"recording {recording.id} is transformed ({', '.join(changed)}); mlpl reads its file as it is"
    source = sources[0]
    if source.type == "file":
        return _absolute(source.source), None
    if source.type == "url":
        return source.source, None
    return None, f"recording {recording.id}'s audio is of source type '{source.type}' (mlpl reads 'file' and 'url')"


def _clip(clip_id: str, audio: str, start_s: float, end_s: float, whole_s: float, *, text: str | None,
          language: str | None, speaker: str | None, split: str | None) -> SourceRow:
    """The row of the stretch [start_s, end_s) of an audio file `whole_s` long."""
    if start_s < -_TOLERANCE_S or end_s > whole_s + _TOLERANCE_S:
        return reject(f"{clip_id} spans {start_s:g}..{end_s:g} s, outside its recording (0..{whole_s:g} s)",
                      id=clip_id, audio=audio, language=language)
    row: dict[str, Any] = {"id": clip_id, "audio": audio, "language": language, "text": text,
                           "duration_s": round(end_s - start_s, 6), "speaker": speaker}
    if start_s > _TOLERANCE_S or end_s < whole_s - _TOLERANCE_S:
        row["start_s"] = round(max(start_s, 0.0), 6)
        row["end_s"] = round(min(end_s, whole_s), 6)
    # A clip without text can only be unlabeled; empty text keeps its split so the importer rejects it.
    return SourceRow("unlabeled" if text is None else split or "labeled", row)


def _supervision_clips(owner_id: str, audio: str | None, reason: str | None, offset_s: float, duration_s: float,
                       whole_s: float, supervisions, *, split: str | None, language: str | None) -> Iterator[SourceRow]:
    """One row per supervision (times relative to `offset_s` in the audio), or one unlabeled row over
    [offset_s, offset_s + duration_s) when there are none; rejects with `reason` when the audio is unusable."""
    if not supervisions:
        if reason:
            yield reject(reason, id=owner_id, audio=audio, language=language_code(language))
        else:
            yield _clip(owner_id, audio, offset_s, offset_s + duration_s, whole_s, text=None,
                        language=language_code(language), speaker=None, split=split)
        return
    for sup in supervisions:
        lang = language_code(sup.language or language)
        if reason:
            yield reject(reason, id=sup.id, audio=audio, language=lang)
        else:
            yield _clip(sup.id, audio, offset_s + sup.start, offset_s + sup.end, whole_s, text=sup.text,
                        language=lang, speaker=sup.speaker, split=split)


def _cut_rows(url: str, *, split: str | None, language: str | None) -> Iterator[SourceRow]:
    """The clips of a CutSet manifest; supervision times are the cut's start plus theirs."""
    from lhotse.cut import MixedCut

    for cut in _items(url):
        if not _is_cut(cut):
            yield reject(f"{type(cut).__name__} in a CutSet manifest", id=getattr(cut, "id", None))
            continue
        if isinstance(cut, MixedCut):
            audio, reason = None, f"cut {cut.id} is a MixedCut (a mix or padding of tracks), not one recording"
        elif not cut.has_recording:
            audio, reason = None, f"cut {cut.id} has no recording"
        else:
            audio, reason = _audio(cut.recording)
        whole_s = cut.recording.duration if audio else cut.duration
        yield from _supervision_clips(cut.id, audio, reason, cut.start, cut.duration, whole_s, cut.supervisions,
                                      split=split, language=language)


def _shar_rows(cuts_url: str, tar_url: str, *, split: str | None, language: str | None) -> Iterator[SourceRow]:
    """The clips of one Shar shard; each cut's audio is its member of the shard's recording tar."""
    members = _tar_data_members(tar_url)
    for cut in _items(cuts_url):
        member = next(members, None)
        # The Shar writer puts one data member per cut, in the cuts' order, named after the cut id.
        if member is None or not member.startswith(f"{cut.id}."):
            raise SourceLayoutError(f"{tar_url}: found {member!r} where the recording of cut {cut.id} was expected; "
                                    "expected a Shar shard as CutSet.to_shar writes it")
        if member.endswith(".nodata"):
            audio, reason = None, f"cut {cut.id} has no recording in the Shar folder"
        else:
            audio, reason = f"tar://{member}::{tar_url}", None
        # Shar keeps only the cut's stretch of audio (its start is written as 0): times are within the cut.
        yield from _supervision_clips(cut.id, audio, reason, 0.0, cut.duration, cut.duration, cut.supervisions,
                                      split=split, language=language)


def _tar_data_members(url: str) -> Iterator[str]:
    """Names of a Shar tar's data members (each cut's audio or `.nodata`), headers only (the reader seeks over
    the audio)."""
    with files.open_binary(url) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for info in tar:
            if not info.name.endswith((".json", ".nometa")):
                yield info.name


def _pair_rows(recordings_url: str, supervisions_url: str, *, split: str | None,
               language: str | None) -> Iterator[SourceRow]:
    """The clips of a RecordingSet + SupervisionSet pair; supervision times are within the recording."""
    for recording, supervisions, recording_id in _joined(recordings_url, supervisions_url):
        if recording is None:
            for sup in supervisions:
                yield reject(f"supervision {sup.id}'s recording {recording_id} is not in {_name(recordings_url)}",
                             id=sup.id, language=language_code(sup.language or language))
            continue
        audio, reason = _audio(recording)
        yield from _supervision_clips(recording.id, audio, reason, 0.0, recording.duration, recording.duration,
                                      supervisions, split=split, language=language)


def _joined(recordings_url: str, supervisions_url: str) -> Iterator[tuple[Any, list, str]]:
    """(recording or None, its supervisions, recording id) for every recording and every recording id the
    supervisions name; streamed when the files are in the same order, else through an index of recordings."""
    if _same_order(recordings_url, supervisions_url):
        yield from _joined_in_order(recordings_url, supervisions_url)
    else:
        yield from _joined_by_index(recordings_url, supervisions_url)


def _same_order(recordings_url: str, supervisions_url: str) -> bool:
    """Whether the supervisions come grouped by recording, in the recordings' order (ids only, O(1) memory)."""
    recording_ids = _ids(recordings_url, "id")
    previous = None
    for recording_id in _ids(supervisions_url, "recording_id"):
        if recording_id == previous:
            continue
        if not any(r == recording_id for r in recording_ids):  # advances the recordings to this one
            return False
        previous = recording_id
    return True


def _joined_in_order(recordings_url: str, supervisions_url: str) -> Iterator[tuple[Any, list, str]]:
    supervisions = _items(supervisions_url)
    pending = next(supervisions, None)
    for recording in _items(recordings_url):
        group = []
        while pending is not None and pending.recording_id == recording.id:
            group.append(pending)
            pending = next(supervisions, None)
        yield recording, group, recording.id


def _joined_by_index(recordings_url: str, supervisions_url: str) -> Iterator[tuple[Any, list, str]]:
    from lhotse import Recording

    index = {json.loads(line)["id"]: line for _, line in _lines(recordings_url)}
    used: set[str] = set()
    for sup in _items(supervisions_url):
        line = index.get(sup.recording_id)
        used.add(sup.recording_id)
        yield (None if line is None else Recording.from_dict(json.loads(line))), [sup], sup.recording_id
    for recording_id, line in index.items():
        if recording_id not in used:
            yield Recording.from_dict(json.loads(line)), [], recording_id
