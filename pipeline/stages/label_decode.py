"""The decode path of labeling (docs/architecture.md, "Pseudo-label generation"): a run's plan (its teachers, work
units and keys), clips decoded through a language's teacher and decoder exactly as its units are (whole clips
batched, long ones in crops), and the filters that judge each pseudo-label. Labeling (`label`) and the dev audit
(`label_audit`) both build on it."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch

from pipeline.config import LabelConfig
from pipeline.data.audio import probe_audio
from pipeline.data.rows import Reject, Utterance
from pipeline.data.stream import LazyBatchLoader, LoadedBatch
from pipeline.engine.beam import BeamDecoder
from pipeline.engine.decode import CropSpec, decode_features
from pipeline.engine.device import precision_used, resolve_device
from pipeline.engine.model import Trained, load_trained
from pipeline.stages.lm import open_decoder
from storage.files import sha256_of
from storage.pl import LabelStore, confidence_passes


@dataclass(frozen=True)
class Teacher:
    """A language's teacher checkpoint and its identity."""

    language: str
    url: str
    sha256: str
    name: str  # "<stage>@<step>" from the checkpoint, e.g. "slimipl/sl@400"

    @property
    def ident(self) -> str:
        """The `teacher` column: name and a sha256 prefix."""
        return f"{self.name}:{self.sha256[:16]}"


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive rows of one language in manifest order: one Parquet file, one shard, one commit."""

    language: str
    index: int
    utterances: tuple[Utterance, ...]
    rows_sha256: str
    # Whether one of its ids had a PL row when the run was planned: only then does its commit look for earlier rows
    # to supersede (a first labeling of a big root would otherwise scan the table once per unit).
    supersedes: bool = True

    @property
    def name(self) -> str:
        """`<lang>-<NNNNNN>`."""
        return LabelStore.unit_name(self.language, self.index)

    @property
    def audio_s(self) -> float:
        """Declared (or header) seconds of audio."""
        return sum(u.duration_s for u in self.utterances)


@dataclass
class LabelPlan:
    """What one labeling run will do: its units, teachers and keys (small; passed to workers)."""

    cfg: LabelConfig
    root: str
    manifest_sha256: str
    teachers: dict[str, Teacher]
    # language → decode key of what decodes and the corpus-wide filters (precision, the teacher's front end, the LM
    # included): also the dev audit's key, so a per-language confidence threshold read off the audit leaves it as is
    decode_keys: dict[str, str]
    precision: str
    units: list[WorkUnit]
    input_rejects: dict[str, Counter] = field(default_factory=dict)  # language → category counts
    lm_identities: dict[str, str] = field(default_factory=dict)  # language → its LM's identity (meta.json)
    audit: dict[str, Any] | None = None  # language → its dev audit and threshold (label_audit.audit_view)
    threshold_notes: dict[str, str] = field(default_factory=dict)  # language → where its threshold came from

    def unit_decode_key(self, language: str) -> str:
        """The language's decode key plus its confidence threshold, if any: what a unit's rows depend on."""
        key = self.decode_keys.get(language, "none")
        threshold = self.cfg.min_confidence_by_language.get(language)
        if not threshold:  # None, or 0 (rejects nothing): roots labeled before thresholds existed keep their keys
            return key
        return hashlib.sha256(json.dumps({"decode": key, "min_confidence": threshold}).encode()).hexdigest()[:16]

    def unit_keys(self, unit: WorkUnit) -> dict[str, str]:
        """What a committed unit must match to be skipped."""
        teacher = self.teachers.get(unit.language)
        return {"rows": unit.rows_sha256, "teacher": teacher.sha256 if teacher else "none",
                "decode": self.unit_decode_key(unit.language)}

    def beam(self, language: str, trained: Trained) -> BeamDecoder | None:
        """The language's LM-fused beam search (its LM files fetched locally once; the LM's identity as planned,
        not read again per unit), or None: greedy."""
        cfg = self.cfg.decoders.get(language)
        return None if cfg is None else open_decoder(language, cfg, trained.tokenizer,
                                                     self.lm_identities.get(language))

    def decode_column(self, language: str) -> str:
        """The `decode` column: what decoded (greedy, or the beam search and its LM settings), on which engine
        and precision, and the key."""
        cfg = self.cfg.decoders.get(language)
        return (f"{'greedy' if cfg is None else cfg.describe()} on {self.cfg.engine} {self.precision} "
                f"#{self.unit_decode_key(language)}")


def decode_precision(cfg: LabelConfig) -> str:
    """The precision the labeling engine runs: what bf16 autocast really does on the device (torch), or the
    exported model's weights (onnxruntime: fp32 or int8)."""
    if cfg.engine == "onnxruntime":
        return cfg.onnx_precision
    return precision_used(cfg.bf16, resolve_device(cfg.device))


def decode_device(cfg: LabelConfig) -> torch.device:
    """Where the teachers run: the config's device (torch), or the CPU (ONNX Runtime's CPU build)."""
    return torch.device("cpu") if cfg.engine == "onnxruntime" else resolve_device(cfg.device)


@lru_cache(maxsize=8)
def teacher_model(url: str, sha256: str) -> Trained:
    """A teacher loaded once per process (keyed by content, so a replaced file is reloaded)."""
    del sha256
    return load_trained(url)


@lru_cache(maxsize=8)
def _onnx_teacher(url: str, sha256: str, precision: str, threads: int | None) -> Trained:
    """A teacher exported to ONNX Runtime once per process (keyed by content, precision and threads)."""
    del sha256
    from pipeline.engine.onnx_runtime import onnx_runtime_teacher  # onnx and onnxruntime load only when asked for

    return onnx_runtime_teacher(url, precision, threads)  # type: ignore[arg-type]


def engine_model(cfg: LabelConfig, url: str, sha256: str) -> Trained:
    """A teacher as the config's labeling engine runs it, on its device."""
    if cfg.engine == "onnxruntime":
        return _onnx_teacher(url, sha256, cfg.onnx_precision, cfg.num_threads)
    trained = teacher_model(url, sha256)
    trained.model.to(decode_device(cfg))  # once per process: a no-op when it is there already
    return trained


def load_teacher(language: str, url: str) -> Teacher:
    """A language's teacher checkpoint, loaded once per process, and its identity.

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: when the checkpoint does not know the language.
    """
    try:
        sha = sha256_of(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"teacher checkpoint for {language!r} not found: {url}") from None
    trained = teacher_model(url, sha)
    if language not in trained.languages:
        raise ValueError(f"teacher {url} does not know language {language!r} (its languages: "
                         f"{', '.join(trained.languages)}); map {language!r} to a checkpoint trained on it")
    ckpt = trained.checkpoint
    return Teacher(language, url, sha, f"{ckpt.get('stage', 'checkpoint')}@{ckpt.get('step', 0)}")


def rows_sha256(utts: Sequence[Utterance]) -> str:
    """The sha256 of a unit's rows (id, audio, duration, language, etag): part of the unit's key."""
    # The etag joins the key only where a row has one, so roots labeled before it existed keep their keys.
    blob = json.dumps([[u.id, u.audio, u.duration_s, u.language] + ([u.etag] if u.etag else []) for u in utts],
                      ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def with_duration(u: Utterance) -> Utterance:
    """A row whose duration is missing gets it from the file header; an unreadable header leaves 0 (the row
    is then rejected with the exact reason when its unit decodes it)."""
    if math.isfinite(u.duration_s) and u.duration_s > 0:
        return u
    try:
        return replace(u, duration_s=probe_audio(u.audio))
    except Exception:  # any failure here is reported by the decoder, with its reason, inside the unit
        return replace(u, duration_s=0.0)


def filter_reason(decoded: dict[str, Any], language: str, cfg: LabelConfig,
                  threshold_note: str | None = None) -> tuple[str, str] | None:
    """(category, reason) when a PL must be dropped, else None; `threshold_note` says where the language's
    confidence threshold came from (e.g. the dev audit)."""
    f, n = cfg.filters, decoded["num_tokens"]
    if n < f.min_tokens:
        return "empty_pl", f"pseudo-label has {n} tokens, below filters.min_tokens={f.min_tokens}"
    if n > f.max_tokens:
        return "too_long_pl", f"pseudo-label has {n} tokens, above filters.max_tokens={f.max_tokens}"
    if f.min_confidence is not None and not confidence_passes(decoded["confidence"], f.min_confidence):
        return ("low_confidence",
                f"confidence {decoded['confidence']:.3f} is below filters.min_confidence={f.min_confidence}")
    threshold = cfg.min_confidence_by_language.get(language)
    if threshold is not None and not confidence_passes(decoded["confidence"], threshold):
        return ("low_confidence", f"confidence {decoded['confidence']:.3f} is below {language!r}'s threshold "
                f"min_confidence_by_language[{language!r}]={threshold} ({threshold_note or 'set in the config'})")
    if f.require_lid_agreement and decoded["lid_pred"] != language:
        return ("lid_mismatch", f"LID predicts {decoded['lid_pred']!r} (p={decoded['lid_prob']:.3f}) but the row "
                f"says {language!r}")
    return None


@dataclass
class UnitStats:
    """What one unit's labeling cost and found (also the record's numbers)."""

    audio_s: float = 0.0  # decoded seconds that went through the model
    model_s: float = 0.0  # wall seconds in decode_batch
    frames: int = 0  # valid fbank frames fed to the model
    padded_frames: int = 0  # fbank frames including batch padding


def unit_batches(unit: WorkUnit, trained: Trained, cfg: LabelConfig, *, source: str | None = None,
                 with_flac: bool = True):
    """(loader, crop) pairs: whole clips in length-sorted batches, then long clips one at a time in crops."""
    whole = [u for u in unit.utterances if u.duration_s <= cfg.max_whole_s]
    long = [u for u in unit.utterances if u.duration_s > cfg.max_whole_s]
    common = dict(features=trained.features, policy=cfg.audio, shuffle=False, with_flac=with_flac,
                  prefetch_batches=cfg.prefetch_batches, source=source or cfg.manifest)
    frames_per_s = 1000.0 / trained.features.hop_ms
    if whole:
        yield LazyBatchLoader(whole, max_batch_duration_s=cfg.batch.max_batch_duration_s,
                              max_batch_size=cfg.batch.max_batch_size, num_buckets=cfg.batch.num_buckets,
                              **common), None
    if long:
        crop = CropSpec(round(cfg.crop_s * frames_per_s), round(cfg.crop_overlap_s * frames_per_s))
        yield LazyBatchLoader(long, max_batch_duration_s=max(u.duration_s for u in long), max_batch_size=1,
                              num_buckets=1, **common), crop


def decode_batch(batch: LoadedBatch, trained: Trained, cfg: LabelConfig, crop: CropSpec | None,
                 stats: UnitStats, beam: BeamDecoder | None = None, keep_log_probs: bool = False,
                 known_language: bool = True) -> list[dict[str, Any]]:
    """One loaded batch through the teacher (and the beam search when given), its cost added to `stats`."""
    t0 = time.perf_counter()
    # The manifest's language conditions a language-conditioned teacher; LID of unlabeled-language rows runs "unknown".
    clip_languages = [u.language for u in batch.utterances] if known_language else None
    out = decode_features(trained.model, batch.features, tokenizer=trained.tokenizer, languages=trained.languages,
                          bf16=cfg.bf16, crop=crop, beam=beam, keep_log_probs=keep_log_probs,
                          clip_languages=clip_languages)
    stats.model_s += time.perf_counter() - t0
    lens = [f.shape[0] for f in batch.features]
    stats.frames += sum(lens)
    stats.padded_frames += len(lens) * max(lens)
    stats.audio_s += sum(batch.durations_s or [])
    return out


def identify_languages(utts: Sequence[Utterance], checkpoint: str,
                       cfg: LabelConfig) -> tuple[dict[str, Any], list[Reject]]:
    """The LID head's language for each clip ({id: (language, probability)}) through the labeling decode path
    (long clips in crops); clips that cannot be read come back as rejects with the reason."""
    trained = engine_model(cfg, checkpoint, sha256_of(checkpoint))
    unit = WorkUnit(trained.languages[0], 0, tuple(with_duration(u) for u in utts), rows_sha256(utts))
    found: dict[str, Any] = {}
    rejects: list[Reject] = []
    for loader, crop in unit_batches(unit, trained, cfg):
        with loader:
            for batch in loader.iter_epoch(0):
                decoded = decode_batch(batch, trained, cfg, crop, UnitStats(), known_language=False)
                for u, d in zip(batch.utterances, decoded, strict=True):
                    found[u.id] = (d["lid_pred"], d["lid_prob"])
            rejects += loader.rejects
    return found, rejects


def decode_clips(plan: LabelPlan, language: str, utts: Sequence[Utterance],
                 source: str) -> tuple[list[tuple[Utterance, dict[str, Any]]], list[Reject]]:
    """Clips decoded with the language's teacher and decoder exactly as its units are (whole clips batched, long
    ones in crops), writing nothing: (clip, decoded row) pairs, and the clips that could not be read."""
    teacher = plan.teachers[language]
    trained = engine_model(plan.cfg, teacher.url, teacher.sha256)
    beam = plan.beam(language, trained)
    unit = WorkUnit(language, 0, tuple(with_duration(u) for u in utts), "")
    found: list[tuple[Utterance, dict[str, Any]]] = []
    rejects: list[Reject] = []
    for loader, crop in unit_batches(unit, trained, plan.cfg, source=source, with_flac=False):
        with loader:
            for batch in loader.iter_epoch(0):
                decoded = decode_batch(batch, trained, plan.cfg, crop, UnitStats(), beam)
                found += zip(batch.utterances, decoded, strict=True)
            rejects += loader.rejects
    return found, rejects
