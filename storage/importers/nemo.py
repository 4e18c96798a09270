"""NeMo ASR manifests read as mlpl rows: plain manifests (JSON lines beside the audio) and tarred datasets
(`tarred_audio_manifest.json` + `audio_<n>.tar`, audio read in place from the tars).

A NeMo row is `{"audio_filepath", "duration", "text"}` plus optional `lang` and `offset` (other keys are
ignored); a row with `offset` is the stretch [offset, offset + duration) of a longer file.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

from storage import files
from storage.importers import SourceLayoutError, SourceRow, reject, split_from_name

TARRED_MANIFEST = "tarred_audio_manifest.json"


def read(src: str, *, split: str | None = None, language: str | None = None) -> Iterator[SourceRow]:
    """Rows of a NeMo manifest file or a folder of `*.json`/`*.jsonl` manifests, streamed line by line.

    Split: `split`, else the manifest's file name (`split_from_name`), else labeled; a row without text is
    unlabeled. Id: the audio path relative to the manifest's folder without its extension (the absolute path
    when the audio lies outside that folder), plus `@<offset>` (seconds, at most 3 decimals) when the row has an
    offset, so the segments of one file differ and a reread gives the same ids.

    Raises:
        SourceLayoutError: when no manifest is found, or a manifest's rows have no `audio_filepath`.
    """
    for manifest in _manifests(src):
        if posixpath.basename(manifest) == TARRED_MANIFEST:
            raise SourceLayoutError(f"{manifest} is a tarred NeMo manifest: import it with format nemo-tarred")
        folder = _folder(manifest)
        file_split = split or split_from_name(posixpath.basename(manifest))
        for obj in _objects(manifest):
            if isinstance(obj, SourceRow):
                yield obj
                continue
            if "shard_id" in obj and "audio_filepath" in obj:
                raise SourceLayoutError(f"{manifest} is a tarred NeMo manifest (rows have `shard_id`): import it with "
                                        "format nemo-tarred")
            path = obj.get("audio_filepath")
            if not isinstance(path, str) or not path:
                yield reject(f"{manifest}: the row has no `audio_filepath`", language=obj.get("lang"))
                continue
            audio = files.resolve_relative(path, manifest)
            yield _row(obj, _strip_ext(_relative_or_absolute(audio, folder)), audio, file_split, language)


def read_tarred(src: str, *, tars: str | Sequence[str] | None = None, split: str | None = None,
                language: str | None = None) -> Iterator[SourceRow]:
    """Rows of a NeMo tarred dataset, streamed: `src` is its manifest or the folder holding
    `tarred_audio_manifest.json`; each row's audio is `tar://<member>::<tar>` of its `shard_id`'s tar.

    `tars`: NeMo's brace pattern (`audio_{0..3}.tar`, `audio__OP_0..3_CL_.tar`) or a list, relative to the
    manifest's folder unless absolute; by default every `audio_<n>.tar` beside the manifest. A tar's shard id is
    the number in its name (its position in the list when the names do not number the shards). Id: the member
    name without its extension, plus `@<offset>` as in `read`. The tars are not opened here.

    Raises:
        SourceLayoutError: when there is no manifest, no tar, or the manifest's rows have no `audio_filepath`.
    """
    manifest = _tarred_manifest(src)
    shards = _shards(manifest, tars)
    missing = {tar for tar in shards.values() if not files.exists(tar)}  # checked once per tar, never per row
    file_split = split or split_from_name(posixpath.basename(manifest))
    for obj in _objects(manifest):
        if isinstance(obj, SourceRow):
            yield obj
            continue
        member = obj.get("audio_filepath")
        if not isinstance(member, str) or not member:
            yield reject(f"{manifest}: the row has no `audio_filepath`", language=obj.get("lang"))
            continue
        uid = _strip_ext(member)
        shard = obj.get("shard_id")
        tar = shards.get(shard) if _is_number(shard) else None
        if tar is None or tar in missing:
            why = f"its tar {tar} does not exist" if tar else f"no tar has this shard id ({_describe(tars, manifest)})"
            yield reject(f"shard_id {shard!r}: {why}", id=_with_offset(uid, obj), audio=member,
                         language=obj.get("lang"))
            continue
        yield _row(obj, uid, f"tar://{member}::{tar}", file_split, language)


def _row(obj: dict[str, Any], base_id: str, audio: str, file_split: str | None,
         language: str | None) -> SourceRow:
    """One NeMo row as a manifest row (or a reject)."""
    uid = _with_offset(base_id, obj)
    lang = obj.get("lang") or language
    if not lang:
        return reject("no language: the row has no `lang` and --language was not given", id=uid, audio=audio)
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        return reject(f"`text` is not a string: {text!r}", id=uid, audio=audio, language=lang)
    row: dict[str, Any] = {"id": uid, "audio": audio, "language": lang}
    duration = obj.get("duration")
    if duration is not None:
        row["duration_s"] = duration  # the importer checks it is a number
    offset = obj.get("offset")
    if offset is not None:
        if not _is_number(offset) or not _is_number(duration):
            return reject(f"`offset` {offset!r} needs a numeric `duration` (got {duration!r}): the clip's end is "
                          "unknown", id=uid, audio=audio, language=lang)
        row["start_s"], row["end_s"] = float(offset), float(offset) + float(duration)
    if text is None:
        return SourceRow("unlabeled", row)
    row["text"] = text
    return SourceRow(file_split or "labeled", row)


def _manifests(src: str) -> list[str]:
    """The manifest files of `src` (itself when it is a file)."""
    fs, path = files.filesystem(src)
    if fs.isfile(path):
        return [src]
    if fs.isdir(path):
        found = files.list_files(src, "*.json") + files.list_files(src, "*.jsonl")
        if found:
            return sorted(found)
    raise SourceLayoutError(f"no NeMo manifest at {src}: expected a JSON-lines manifest (e.g. train_manifest.json) "
                            "or a folder of *.json/*.jsonl manifests")


def _tarred_manifest(src: str) -> str:
    """The tarred manifest of `src` (itself when it is a file)."""
    fs, path = files.filesystem(src)
    if fs.isfile(path):
        return src
    candidate = files.join(src, TARRED_MANIFEST)
    if fs.isdir(path) and files.exists(candidate):
        return candidate
    raise SourceLayoutError(f"no {TARRED_MANIFEST} at {src}: expected a NeMo tarred dataset "
                            f"({TARRED_MANIFEST} + audio_<n>.tar)")


def _objects(manifest: str) -> Iterator[dict[str, Any] | SourceRow]:
    """The JSON objects of a manifest, one per line, or a reject for a line that is not one; the first object
    decides whether the file is a NeMo manifest at all."""
    checked = False
    with files.open_binary(manifest) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            where = f"{manifest} line {lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield reject(f"{where}: not UTF-8")
                continue
            except ValueError as err:
                yield reject(f"{where}: not JSON ({err})")
                continue
            if not isinstance(obj, dict):
                yield reject(f"{where}: not a JSON object")
                continue
            if not checked and "audio_filepath" not in obj:
                raise SourceLayoutError(f"{manifest} is not a NeMo manifest: its rows have no `audio_filepath` "
                                        f"(line {lineno} has {sorted(obj)[:6]})")
            checked = True
            yield obj


def _shards(manifest: str, tars: str | Sequence[str] | None) -> dict[int, str]:
    """Shard id → absolute tar URL."""
    if tars is None:
        found = files.list_files(_folder(manifest), "audio_*.tar")
        paths = [p for p in found if re.fullmatch(r"audio_\d+\.tar", posixpath.basename(p))]
        if not paths:
            raise SourceLayoutError(f"no audio_<n>.tar beside {manifest}: expected the NeMo tarred dataset's tars "
                                    "there (or pass their pattern)")
    else:
        names = expand_braces(tars) if isinstance(tars, str) else list(tars)
        paths = [files.resolve_relative(name, manifest) for name in names]
    numbers = [re.findall(r"\d+", posixpath.basename(p)) for p in paths]
    ids = [int(n[-1]) for n in numbers if n]
    if len(ids) != len(paths) or len(set(ids)) != len(ids):
        ids = list(range(len(paths)))  # the names do not number the shards: NeMo's order is the list's
    return dict(zip(ids, paths, strict=True))


def expand_braces(pattern: str) -> list[str]:
    """NeMo's tar pattern expanded: `{0..3}` / `_OP_0..3_CL_` ranges (zero padding kept) and `{a,b}` lists."""
    pattern = pattern.replace("_OP_", "{").replace("_CL_", "}")
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = bounds.groups()
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def _folder(manifest: str) -> str:
    """The absolute folder (URL) of a manifest."""
    return posixpath.dirname(files.resolve_relative("x", manifest))


def _describe(tars: str | Sequence[str] | None, manifest: str) -> str:
    if tars is None:
        return f"audio_<n>.tar beside {manifest}"
    return tars if isinstance(tars, str) else f"{len(tars)} tars given"


def _with_offset(base_id: str, obj: dict[str, Any]) -> str:
    offset = obj.get("offset")
    if offset is None:
        return base_id
    if _is_number(offset):
        return f"{base_id}@{f'{float(offset):.3f}'.rstrip('0').rstrip('.')}"
    return f"{base_id}@{offset}"


def _relative_or_absolute(audio: str, folder: str) -> str:
    """`audio` relative to `folder` when inside it, else its whole path (so ids of outside files stay unique)."""
    path, base = audio.split("://", 1)[-1], folder.split("://", 1)[-1].rstrip("/")
    if path.startswith(base + "/"):
        return path[len(base) + 1:]
    return path.lstrip("/")


def _strip_ext(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return stem if ext and "/" not in ext else path


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
