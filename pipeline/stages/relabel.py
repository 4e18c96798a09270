"""The relabel job (docs/architecture.md, "Relabel"): label what arrived in a watched folder since the last run.

A run lists the watched folder (any fsspec URL), names each file's language (its first folder, or the manifests
found there; the LID head of a multilingual checkpoint where that is unknown or has no teacher), and anti-joins
the files against the latest labeling attempt of each id in the labels root on (audio URI, size or ETag,
teacher). What is new, changed, or was labeled by another teacher goes into a manifest of its own under
`catalog/relabel/` and through the resumable labeling writer; everything else is left alone, so a second run
finds nothing to do. The new rows supersede the old ones of the same id (`storage.pl.load_pseudo_labels`
keeps each id's latest attempt). One lock file per labels root keeps two runs from numbering units at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections import Counter
from typing import Any

from pipeline.config import RelabelConfig, normalize_language
from pipeline.data.rows import ProgressFn, Utterance
from pipeline.layout import RunLayout, teachers_for_run
from pipeline.stages.label import run_label
from pipeline.stages.label_decode import identify_languages, load_teacher
from pipeline.stages.label_summary import reject_category
from pipeline.stages.lm import tuned_decoders
from storage.files import StorageLock, atomic_write_text, exists, file_listing
from storage.manifest import read_manifest
from storage.pl import LabelStore, latest_attempts

log = logging.getLogger("mlpl.relabel")

UNKNOWN = "und"  # BCP-47 "undetermined": rows no teacher takes are rejected with that reason


def scan(cfg: RelabelConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The watched folder as manifest rows {id, audio, language, etag} (language None when unknown), and the
    rows of its manifests that could not be used (mode `manifest`)."""
    suffixes = tuple(e.lower() for e in cfg.extensions)
    if cfg.language_from == "path":
        rows = []
        for f in file_listing(cfg.watch, suffixes):
            folder = f["relpath"].split("/", 1)[0] if "/" in f["relpath"] else ""
            rows.append({"id": f["relpath"], "audio": f["url"], "language": normalize_language(folder) if folder
                         else None, "etag": f["etag"]})
        return rows, []
    files = {f["url"]: f for f in file_listing(cfg.watch, suffixes)}
    rows, bad = [], []
    for m in file_listing(cfg.watch, (".jsonl",)):
        listed, line_rejects = read_manifest(m["url"])
        bad += [{"source": m["url"], "reason": r["reason"]} for r in line_rejects]
        for n, row in enumerate(listed, start=1):
            if not row.get("audio"):
                bad.append({"source": m["url"], "reason": f"row {n}: missing field(s) audio"})
                continue
            url = str(row["audio"])  # read_manifest resolved it against the manifest's folder
            f = files.get(url)
            lang = normalize_language(str(row["language"])) if row.get("language") else None
            rows.append({"id": str(row.get("id") or posixpath.relpath(url, cfg.watch.rstrip("/"))), "audio": url,
                         "language": lang, "etag": f["etag"] if f else "missing"})
    return rows, bad


def _same(stored: Any, now: Any) -> bool:
    """Equal, where a missing value (None, or NaN as pandas reads a null) equals only another missing one."""
    missing = stored is None or (isinstance(stored, float) and math.isnan(stored))
    return now is None if missing else stored == now


def _teachers(cfg: RelabelConfig) -> dict[str, str]:
    return dict(cfg.teachers) if cfg.teachers else teachers_for_run(cfg.run_dir)


def _name_languages(cfg: RelabelConfig, rows: list[dict[str, Any]], done, teachers: dict[str, str]) -> int:
    """Give every row a language: an unchanged file named by LID earlier keeps that name (LID runs once per file);
    a file whose language is unknown asks the LID head (with unknown_language=lid); the rest is "und", which
    labeling rejects with its teacher-less reason. Returns how many LID named."""
    for r in rows:
        if r["language"] is None and done is not None and r["id"] in done.index \
                and _same(done.loc[r["id"], "audio_etag"], r["etag"]):
            r["language"] = done.loc[r["id"], "language"]
    # Only a file whose language is unknown asks the LID head; one in a language without a teacher is rejected
    # with that reason (LID would name a wrong language that has one).
    unknown = [r for r in rows if r["language"] is None]
    by_lid = 0
    if unknown and cfg.unknown_language == "lid":
        checkpoint = cfg.lid_checkpoint or RunLayout(cfg.run_dir).supervised.best
        utts = [Utterance(r["id"], r["audio"], 0.0, UNKNOWN) for r in unknown]
        found, _ = identify_languages(utts, checkpoint, cfg.label_config(cfg.watch, teachers))
        for r in unknown:
            if r["id"] in found:
                r["language"], by_lid = found[r["id"]][0], by_lid + 1
    for r in rows:
        r["language"] = r["language"] or UNKNOWN
    return by_lid


def _to_label(rows: list[dict[str, Any]], done, idents: dict[str, str]) -> tuple[list[dict[str, Any]], Counter]:
    """The anti-join: rows that are new, whose file changed, or that another teacher labeled; and why."""
    todo, why = [], Counter()
    for r in rows:
        prev = None if done is None or r["id"] not in done.index else done.loc[r["id"]]
        if prev is None:
            why["new"] += 1
        elif not _same(prev["audio_etag"], r["etag"]) or not _same(prev["audio"], r["audio"]):
            why["file_changed"] += 1
        elif not _same(prev["teacher"], idents.get(r["language"])):
            why["teacher_changed"] += 1
        else:
            continue
        todo.append(r)
    return todo, why


def _label_new(cfg: RelabelConfig, todo: list[dict[str, Any]], teachers: dict[str, str],
               on_progress: ProgressFn | None) -> dict[str, Any]:
    """Label the rows to do through the resumable writer, from a manifest of their own named by content (a rerun
    after a kill that finds the same files reuses the same unit numbers)."""
    body = "".join(json.dumps({k: r[k] for k in ("id", "audio", "language", "etag")}, ensure_ascii=False) + "\n"
                   for r in sorted(todo, key=lambda r: r["id"]))
    manifest = LabelStore(cfg.labels_root).relabel_manifest_url(hashlib.sha256(body.encode()).hexdigest()[:16])
    if not exists(manifest):
        atomic_write_text(manifest, body)
    decoders = tuned_decoders(cfg.run_dir, teachers) if cfg.run_dir and cfg.lm_from_run else {}
    label = run_label(cfg.label_config(manifest, teachers, decoders), cfg.labels_root, on_progress=on_progress)
    by_reason: Counter = Counter()
    for s in label.summary.values():
        by_reason.update(s["rejected_by_reason"])
    return {"manifest": manifest, "label": label.as_dict(), "rejected_by_reason": dict(sorted(by_reason.items())),
            "hours_labeled": round(sum(s["hours_labeled"] for s in label.summary.values()), 4)}


def run_relabel(cfg: RelabelConfig, *, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Label the new, changed or older-teacher files of the watched folder into the labels root; returns what
    it did: files seen, new, relabeled (and why), unchanged, LID-named, rejected by reason, hours."""
    t0 = time.perf_counter()
    with StorageLock(LabelStore(cfg.labels_root).relabel_lock_url, wait_s=cfg.lock_wait_s):
        teachers = _teachers(cfg)
        idents = {lang: load_teacher(lang, url).ident for lang, url in teachers.items()}
        rows, manifest_rejects = scan(cfg)
        done = latest_attempts(cfg.labels_root).set_index("id") if exists(cfg.labels_root) else None
        by_lid = _name_languages(cfg, rows, done, teachers)
        todo, why = _to_label(rows, done, idents)
        result: dict[str, Any] = {
            "watch": cfg.watch, "labels_root": cfg.labels_root, "files_seen": len(rows),
            "new": why["new"], "relabeled": why["file_changed"] + why["teacher_changed"],
            "relabeled_by_reason": {k: why[k] for k in ("file_changed", "teacher_changed") if why[k]},
            "unchanged": len(rows) - len(todo), "languages_from_lid": by_lid,
            "manifest_rejects": manifest_rejects, "teachers": idents, "manifest": None, "label": None,
            "rejected_by_reason": {}, "hours_labeled": 0.0,
        }
        if todo:
            result |= _label_new(cfg, todo, teachers, on_progress)
        for r in manifest_rejects:
            category = reject_category(r["reason"])
            result["rejected_by_reason"][category] = result["rejected_by_reason"].get(category, 0) + 1
        result["wall_s"] = round(time.perf_counter() - t0, 2)
    log.info("relabel %s: %d files seen, %d new, %d relabeled %s, %d unchanged, %d named by LID, rejects %s",
             cfg.watch, len(rows), result["new"], result["relabeled"], result["relabeled_by_reason"],
             result["unchanged"], by_lid, result["rejected_by_reason"] or "none")
    return result


def relabel_markdown(result: dict[str, Any]) -> str:
    """What a relabel run did, as a Markdown summary."""
    rej = ", ".join(f"{k} {n}" for k, n in result["rejected_by_reason"].items()) or "none"
    why = ", ".join(f"{k} {n}" for k, n in result["relabeled_by_reason"].items()) or "—"
    return (f"### Relabel of `{result['watch']}`\n\n| files seen | new | relabeled | unchanged | named by LID | "
            f"rejected | hours labeled |\n|---:|---:|---:|---:|---:|---|---:|\n| {result['files_seen']} | "
            f"{result['new']} | {result['relabeled']} ({why}) | {result['unchanged']} | {result['languages_from_lid']}"
            f" | {rej} | {result['hours_labeled']:.4f} |\n\nInto `{result['labels_root']}`; manifest of this run: "
            f"`{result['manifest'] or 'none (nothing new)'}`.\n")
