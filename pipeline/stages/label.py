"""Corpus-wide pseudo-label generation (recipe step 4; docs/architecture.md, "Pseudo-label generation").

Every row of an unlabeled manifest is labeled by its language's teacher through the one decode path
(`pipeline.engine.decode`: eval mode, `inference_mode`, bf16 autocast where native, greedy CTC, or CTC beam
search fused with the language's n-gram LM where `decoders` names one),
streaming: length-sorted batches by audio seconds are decoded in a prefetch thread, clips longer than
`max_whole_s` are labeled as overlapping crops stitched back together (`pipeline.engine.crops`), and each clip's
16 kHz mono FLAC goes straight into its shard. Nothing holds more than a batch of audio.

The manifest is split into deterministic work units per language (manifest order, at most
`unit_max_utterances` rows and `unit_max_audio_s` seconds each). A unit is keyed by the sha256 of its rows,
its teacher's sha256 and the decode config; a committed unit with the same keys is skipped, so a rerun does
no model work, and a new teacher or decode config relabels exactly the units it touches, replacing their
files (no duplicate rows). A killed run redoes only the unit that was in flight.

With `audit_manifest`, labeled dev rows are first labeled the same way and scored per confidence bucket
(`label_audit`), and `audit_max_dev_cer` reads per-language confidence thresholds off that audit
(`min_confidence_by_language`, part of a unit's key: a new threshold relabels only its language).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from pipeline.config import LabelConfig
from pipeline.data.rows import ProgressFn, Reject, Utterance, read_utterances
from pipeline.data.stream import LoadedBatch
from pipeline.engine.beam import cached_workers, drop_workers
from pipeline.engine.decode import with_beam_text
from pipeline.stages.label_audit import apply_audit
from pipeline.stages.label_decode import (
    LabelPlan,
    Teacher,
    UnitStats,
    WorkUnit,
    decode_batch,
    decode_precision,
    engine_model,
    filter_reason,
    load_teacher,
    rows_sha256,
    teacher_model,
    unit_batches,
    with_duration,
)
from pipeline.stages.label_summary import reject_category, summary_markdown
from pipeline.stages.lm import lm_identity
from storage.files import atomic_write_text, exists, join, read_text, sha256_of, sweep_temp_files
from storage.pl import LabelStore, ShardWriter, sample_key

log = logging.getLogger("mlpl.label")

# Batches the decoding processes hold while the model runs on (3 measured 12 % faster than 1 on 2 cores: batches
# of long clips take the beam search longer than the model, short ones the other way round).
BEAM_BATCHES_IN_FLIGHT = 3


def split_units(utts: Sequence[Utterance], *, max_utterances: int, max_audio_s: float) -> list[list[Utterance]]:
    """Consecutive rows cut into units of at most `max_utterances` rows and `max_audio_s` declared seconds
    (a single longer clip is a unit of its own)."""
    units: list[list[Utterance]] = []
    cur: list[Utterance] = []
    seconds = 0.0
    for u in utts:
        if cur and (len(cur) >= max_utterances or seconds + u.duration_s > max_audio_s):
            units.append(cur)
            cur, seconds = [], 0.0
        cur.append(u)
        seconds += u.duration_s
    if cur:
        units.append(cur)
    return units


def _reject_row(r: Reject, **extra: Any) -> dict[str, Any]:
    return {"id": r.id, "audio": r.audio, "reason": r.reason, "category": extra.pop("category", None)
            or reject_category(r.reason), "source": r.source} | extra


def plan_labeling(cfg: LabelConfig, root: str) -> LabelPlan:
    """Validate the manifest (no audio decoded), split it into units and record their numbers in the catalog;
    with `audit_manifest`, run the dev audit (cached in the root) and apply the thresholds it chooses.

    Raises:
        FileNotFoundError: when the manifest, the audit manifest or a teacher checkpoint is missing.
        ValueError: when a teacher does not know its language, the root numbered this manifest's units
            with other unit settings, or `audit_max_dev_cer` is set without `audit_manifest`.
    """
    store = LabelStore(root)
    if not exists(cfg.manifest):
        raise FileNotFoundError(f"manifest not found: {cfg.manifest}")
    if cfg.audit_max_dev_cer is not None and cfg.audit_manifest is None:
        raise ValueError(f"audit_max_dev_cer={cfg.audit_max_dev_cer} chooses confidence thresholds from the dev "
                         "audit: set audit_manifest to labeled dev rows, or drop audit_max_dev_cer")
    manifest_sha = sha256_of(cfg.manifest)
    for url in sweep_temp_files(root):  # what a killed run left (under temp names only: readers never saw them)
        log.info("removed %s: a temp file whose writer is gone", url)
    moved = store.upgrade_layout()
    if moved:
        log.info("%s: moved %d files of the layout before schema 3 to plain language folders", root, moved)
    teachers = {lang: load_teacher(lang, url) for lang, url in sorted(cfg.teachers.items())}
    precision = decode_precision(cfg)
    lm_identities = {lang: lm_identity(lang, d.lm) for lang, d in cfg.decoders.items() if lang in teachers}
    decode_keys = {
        lang: cfg.decode_key(precision, teacher_model(t.url, t.sha256).features.model_dump(mode="json"),
                             _decoder_identity(cfg, lang, lm_identities))
        for lang, t in teachers.items()
    }
    utts, rejects = read_utterances(cfg.manifest, require_text=False, languages=None)
    by_lang: dict[str, list[Utterance]] = {}
    for u in utts:
        by_lang.setdefault(u.language, []).append(with_duration(u))
    settings = {"unit_max_utterances": cfg.unit_max_utterances, "unit_max_audio_s": cfg.unit_max_audio_s}
    chunks = {lang: split_units(rows, max_utterances=cfg.unit_max_utterances, max_audio_s=cfg.unit_max_audio_s)
              for lang, rows in sorted(by_lang.items())}
    input_rejects: dict[str, list[dict[str, Any]]] = {}
    for r in rejects:
        input_rejects.setdefault(r.language or "und", []).append(_reject_row(r))
    record = store.manifest_record(manifest_sha)
    if record is None:
        nxt = store.next_unit_numbers()
        record = {"manifest": cfg.manifest, "sha256": manifest_sha, "settings": settings,
                  "units": {lang: [nxt.get(lang, 0), len(c)] for lang, c in chunks.items()},
                  "input_rejects": {lang: len(v) for lang, v in sorted(input_rejects.items())},
                  "created_at": datetime.now(UTC).isoformat()}
        store.register_manifest(manifest_sha, record, input_rejects)
    elif record["settings"] != settings:
        raise ValueError(
            f"{root} already split {cfg.manifest} into units with {record['settings']}; relabeling it with "
            f"{settings} would give its rows two homes. Use the same unit settings or another labels root"
        )
    labeled = store.ids_with_rows(u.id for u in utts)
    units = [
        WorkUnit(lang, record["units"][lang][0] + i, tuple(chunk), rows_sha256(chunk),
                 supersedes=any(u.id in labeled for u in chunk))
        for lang, lang_chunks in chunks.items() for i, chunk in enumerate(lang_chunks)
    ]
    counts = {lang: Counter(r["category"] for r in rows) for lang, rows in input_rejects.items()}
    plan = LabelPlan(cfg, root, manifest_sha, teachers, decode_keys, precision, units, counts, lm_identities)
    if cfg.audit_manifest is None:
        return plan
    return apply_audit(plan)


def _decoder_identity(cfg: LabelConfig, language: str, lm_identities: dict[str, str]) -> dict[str, Any] | None:
    """What of a language's beam decoder changes its rows: its settings and its LM's content (not its URL)."""
    d = cfg.decoders.get(language)
    if d is None:
        return None
    return d.model_dump(mode="json", exclude={"lm"}) | {"lm_identity": lm_identities[language]}


# --- labeling one unit -------------------------------------------------------------------------------------


@dataclass
class UnitOutput:
    """What labeling one unit produces: kept rows (their audio written to the unit's shard as they come), rejects
    with their reasons, and what the model work cost."""

    shard: ShardWriter
    shard_rel: str
    teacher: Teacher | None
    decode: str  # the `decode` column: what decoded and its key
    created_at: datetime
    threshold_note: str | None = None  # where the language's confidence threshold came from (filter_reason)
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stats: UnitStats = field(default_factory=UnitStats)

    def add(self, u: Utterance, d: dict[str, Any], flac: bytes, duration_s: float, cfg: LabelConfig) -> None:
        """One decoded clip: a row (and its shard member) when it passes the filter, else a reject."""
        signals = {"duration_s": round(duration_s, 3), "num_tokens": d["num_tokens"], "confidence": d["confidence"],
                   "lid_pred": d["lid_pred"], "lid_prob": d["lid_prob"], "blank_ratio": d["blank_ratio"],
                   "teacher": self.teacher.ident, "decode": self.decode, "created_at": self.created_at,
                   "audio_etag": u.etag}
        dropped = filter_reason(d, u.language, cfg, self.threshold_note)
        if dropped is not None:
            r = Reject(u.id, u.audio, u.language, dropped[1], "filter")
            self.rejects.append(_reject_row(r, category=dropped[0], text=d["hypothesis"], **signals))
            return
        key = sample_key(u.id)
        row = {"id": u.id, "audio": u.audio, "text": d["hypothesis"], **signals, "shard": self.shard_rel, "key": key}
        self.shard.write(key, flac, row | {"language": u.language, "created_at": self.created_at.isoformat()})
        self.rows.append(row)


def _label_with_teacher(plan: LabelPlan, unit: WorkUnit, out: UnitOutput,
                        on_progress: Callable[[float], None] | None) -> None:
    """Decode the unit's clips with its language's teacher (whole clips batched, long ones in crops)."""
    cfg, teacher = plan.cfg, out.teacher
    trained = engine_model(cfg, teacher.url, teacher.sha256)
    etags = {u.id: u.etag for u in unit.utterances}
    beam = plan.beam(unit.language, trained)
    workers = None if beam is None else cached_workers(beam, cfg.decode_workers)
    in_flight: deque = deque()  # (batch, rows, their posteriors, future of their beam texts): decoding elsewhere

    def commit(batch: LoadedBatch, decoded: list[dict[str, Any]]) -> None:
        for u, d, flac, dur in zip(batch.utterances, decoded, batch.flac, batch.durations_s, strict=True):
            out.add(u, d, flac, dur, cfg)
        if on_progress is not None:
            on_progress(sum(u.duration_s for u in batch.utterances))

    def commit_oldest() -> None:
        nonlocal workers
        batch, decoded, log_probs, texts = in_flight.popleft()
        try:
            found = texts.result()
        except (BrokenProcessPool, CancelledError) as err:  # a child died (memory, a main module it cannot import)
            if workers is not None:  # the first batch to find out stops the rest; all go on in-process
                log.warning("beam search worker failed (%s); decoding %s in the labeling process", err, unit.name)
                drop_workers(workers)
                workers = None
            found = [beam.decode(lp) for lp in log_probs]
        commit(batch, [with_beam_text(d, t, trained.tokenizer, beam.cfg.describe())
                       for d, t in zip(decoded, found, strict=True)])

    threads = torch.get_num_threads()
    if workers is not None:  # the decoding processes get their cores (2 cores: 1 model thread + 1 decoder ran
        torch.set_num_threads(max(1, threads - cfg.decode_workers))  # 15-20 % faster than 2 + 1)
    try:
        for loader, crop in unit_batches(unit, trained, cfg):
            with loader:
                for batch in loader.iter_epoch(0):
                    if workers is None:
                        commit(batch, decode_batch(batch, trained, cfg, crop, out.stats, beam))
                        continue
                    decoded = decode_batch(batch, trained, cfg, crop, out.stats, keep_log_probs=True)
                    log_probs = [d.pop("log_probs") for d in decoded]
                    in_flight.append((batch, decoded, log_probs, workers.submit(log_probs)))
                    while len(in_flight) > BEAM_BATCHES_IN_FLIGHT:
                        commit_oldest()
                while in_flight:
                    commit_oldest()
                for r in loader.rejects:
                    out.rejects.append(_reject_row(r, created_at=out.created_at, teacher=teacher.ident,
                                                   audio_etag=etags.get(r.id)))
    finally:
        torch.set_num_threads(threads)


def _reject_all_without_teacher(plan: LabelPlan, unit: WorkUnit, out: UnitOutput) -> None:
    """A unit of a language that has no teacher: every row is a reject that says so."""
    known = ", ".join(sorted(plan.teachers)) or "none"
    for u in unit.utterances:
        reason = f"no teacher for language {u.language!r} (teachers: {known})"
        out.rejects.append(_reject_row(Reject(u.id, u.audio, u.language, reason, plan.cfg.manifest),
                                       duration_s=u.duration_s or None, created_at=out.created_at,
                                       audio_etag=u.etag))


def _unit_record(plan: LabelPlan, unit: WorkUnit, keys: dict[str, str], out: UnitOutput, wall_s: float) -> dict:
    """The unit's catalog record: its keys, teacher, decode settings, counts, costs and files."""
    cfg, teacher, rows, stats = plan.cfg, out.teacher, out.rows, out.stats
    decode = {"key": keys["decode"], "what": out.decode, "engine": cfg.engine, "precision": plan.precision,
              "config": cfg.model_dump(mode="json", include={"max_whole_s", "crop_s", "crop_overlap_s", "filters",
                                                             "audio"}),
              "decoder": _decoder_identity(cfg, unit.language, plan.lm_identities)}
    threshold = cfg.min_confidence_by_language.get(unit.language)
    if threshold:  # only where one is set, so records of roots without thresholds stay as they were
        decode |= {"min_confidence": threshold, "min_confidence_from": out.threshold_note or "set in the config"}
    return {
        "unit": unit.index, "language": unit.language, "name": unit.name, "keys": keys,
        "manifest": cfg.manifest, "manifest_sha256": plan.manifest_sha256,
        "teacher": None if teacher is None else {"url": teacher.url, "sha256": teacher.sha256, "id": teacher.ident},
        "decode": decode,
        "rows": len(rows), "rejects": len(out.rejects),
        "rejects_by_category": dict(sorted(Counter(r["category"] for r in out.rejects).items())),
        "input_utterances": len(unit.utterances), "audio_s": round(stats.audio_s, 3),
        "kept_audio_s": round(sum(r["duration_s"] for r in rows), 3),
        "confidence_sum": round(sum(r["confidence"] for r in rows), 5),
        "frames": stats.frames, "padded_frames": stats.padded_frames,
        "model_s": round(stats.model_s, 3), "wall_s": round(wall_s, 3),
        "shard": out.shard_rel, "shard_samples": out.shard.count, "shard_bytes": out.shard.bytes,
        "parquet": f"pl/{unit.language}/part-{unit.index:06d}.parquet",
        "created_at": out.created_at.isoformat(),
    }


def label_unit(plan: LabelPlan, unit: WorkUnit, on_progress: Callable[[float], None] | None = None) -> dict:
    """Label one unit and commit it (shard, rejects, PL file, catalog record), or skip it when committed
    with the same keys. Returns the unit's record plus `skipped`, and which process (`worker`) with how many
    torch `threads` ran it (a Dask worker applies the plan's threads before each unit)."""
    if plan.cfg.num_threads is not None and torch.get_num_threads() != plan.cfg.num_threads:
        torch.set_num_threads(plan.cfg.num_threads)
    where = {"worker": f"{socket.gethostname()}:{os.getpid()}", "threads": torch.get_num_threads()}
    store = LabelStore(plan.root)
    keys = plan.unit_keys(unit)
    committed = store.committed_record(unit.language, unit.index, keys)
    if committed is not None:
        if on_progress is not None:
            on_progress(unit.audio_s)
        return committed | {"skipped": True} | where
    t_start = time.perf_counter()
    out = UnitOutput(store.open_shard(unit.language, unit.index), store.shard_relpath(unit.language, unit.index),
                     plan.teachers.get(unit.language), plan.decode_column(unit.language), datetime.now(UTC),
                     plan.threshold_notes.get(unit.language))
    try:
        if out.teacher is None:
            _reject_all_without_teacher(plan, unit, out)
        else:
            _label_with_teacher(plan, unit, out, on_progress)
        wall_s = time.perf_counter() - t_start
        record = _unit_record(plan, unit, keys, out, wall_s)
        store.commit_unit(unit.language, unit.index, shard=out.shard, rows=out.rows, rejects=out.rejects,
                          record=record, supersede=unit.supersedes)
    except BaseException:
        out.shard.abort()
        raise
    _release_freed_memory()
    audio_s = out.stats.audio_s
    log.info("unit %s: %d kept, %d rejected, %.0f s of audio in %.1f s (%.0f audio-s/s; model %.1f s)", unit.name,
             len(out.rows), len(out.rejects), audio_s, wall_s, audio_s / max(wall_s, 1e-9), out.stats.model_s)
    return record | {"skipped": False} | where


def _release_freed_memory() -> None:
    """Hand the unit's freed buffers back to the OS (glibc keeps them otherwise, and fragmentation then grows
    the peak RSS with the number of units labeled; docs/benchmarks.md). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the whole corpus ---------------------------------------------------------------------------------------


def summarize(plan: LabelPlan, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per language: hours labeled, rows kept, rejects by category (input rows included), mean confidence,
    the throughput of the units labeled in this run and, with an audit manifest, the dev audit (`dev_audit`)."""
    out: dict[str, dict[str, Any]] = {}
    languages = sorted({u.language for u in plan.units} | set(plan.input_rejects))
    for lang in languages:
        recs = [r for r in records if r["language"] == lang]
        by_cat: Counter = Counter(plan.input_rejects.get(lang, Counter()))
        for r in recs:
            by_cat.update(r["rejects_by_category"])
        kept = sum(r["rows"] for r in recs)
        fresh = [r for r in recs if not r.get("skipped")]
        wall = sum(r["wall_s"] for r in fresh)
        out[lang] = {
            "units": len(recs),
            "hours_labeled": round(sum(r["audio_s"] for r in recs) / 3600, 4),
            "hours_kept": round(sum(r["kept_audio_s"] for r in recs) / 3600, 4),
            "rows_kept": kept,
            "rows_rejected": sum(by_cat.values()),
            "rejected_by_reason": dict(sorted(by_cat.items())),
            "mean_confidence": round(sum(r["confidence_sum"] for r in recs) / kept, 4) if kept else None,
            "units_labeled_now": len(fresh),
            "audio_s_per_s": round(sum(r["audio_s"] for r in fresh) / wall, 1) if wall > 0 else None,
        }
        if plan.audit and lang in plan.audit:  # the dev audit: the expected quality of this language's PLs
            out[lang]["dev_audit"] = plan.audit[lang]
    return out


@dataclass
class LabelResult:
    """A labeling run: the per-language summary and what this run did."""

    root: str
    summary: dict[str, Any]
    units: int
    units_labeled: int
    units_skipped: int
    model_s: float
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for Prefect results and JSON)."""
        return {"root": self.root, "summary": self.summary, "units": self.units, "units_labeled": self.units_labeled,
                "units_skipped": self.units_skipped, "model_s": round(self.model_s, 3), "wall_s": round(self.wall_s, 3)}


def finish(plan: LabelPlan, records: Sequence[dict[str, Any]], wall_s: float) -> LabelResult:
    """Write `summary.json` / `summary.md` under the root (only when they change) and return the result."""
    summary = summarize(plan, records)
    # Corpus-level figures only in the files, so an idle rerun leaves them byte for byte as they were.
    stable = {lang: {k: v for k, v in s.items() if k not in ("units_labeled_now", "audio_s_per_s")}
              for lang, s in summary.items()}
    files = {
        "summary.json": json.dumps(stable, indent=2, sort_keys=True) + "\n",
        "summary.md": summary_markdown({lang: s | {"audio_s_per_s": None} for lang, s in summary.items()}),
    }
    for name, text in files.items():
        url = join(plan.root, name)
        if not exists(url) or read_text(url) != text:
            atomic_write_text(url, text)
    fresh = [r for r in records if not r.get("skipped")]
    return LabelResult(plan.root, summary, len(records), len(fresh), len(records) - len(fresh),
                       sum(r["model_s"] for r in fresh), wall_s)


def run_label(cfg: LabelConfig, root: str, *, on_progress: ProgressFn | None = None) -> LabelResult:
    """Label a whole manifest into a labels root: plan, label every unit not yet committed, summarize."""
    t0 = time.perf_counter()
    plan = plan_labeling(cfg, root)
    total = sum(u.audio_s for u in plan.units)
    done = 0.0
    log.info("labeling %s: %d units, %.0f s of audio, %s %s; teachers: %s", cfg.manifest, len(plan.units), total,
             cfg.engine, plan.precision, ", ".join(f"{k}={t.ident}" for k, t in plan.teachers.items()))

    def advance(seconds: float) -> None:
        nonlocal done
        done += seconds
        if on_progress is not None:
            on_progress(int(done), int(total), "label audio-s")

    records = [label_unit(plan, unit, advance) for unit in plan.units]
    result = finish(plan, records, time.perf_counter() - t0)
    log.info("labeled %d units, skipped %d committed ones; model %.1f s, wall %.1f s", result.units_labeled,
             result.units_skipped, result.model_s, result.wall_s)
    return result
