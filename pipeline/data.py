"""Manifests → validated utterances → features → dynamic batches (paper Sec. 4 data setup).

Validation happens where a manifest enters: every row is either an `Utterance` with its features or a
`Reject` with a reason; nothing is dropped silently. Batches are formed by audio seconds (paper: 200 s per
batch per GPU) from length-sorted buckets so padding stays small; the sampler's state is two integers.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from models.encoder import frames_after_subsampling
from pipeline.audio import AudioError, load_audio, log_mel, spec_augment
from pipeline.config import AudioPolicy, BatchConfig, FeatureConfig, SpecAugmentConfig
from pipeline.tokenizer import Tokenizer, prepare_text
from storage.manifest import read_manifest

ProgressFn = Callable[[int, int, str], None]

# BCP-47 shape after lower-casing: a 2-3 letter primary subtag, then optional script/region/variant subtags.
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")


def normalize_language(code: str) -> str | None:
    """Canonical form of a language code ("ES" → "es", "pt_BR" → "pt-br"); None when it is not BCP-47 shaped."""
    norm = code.strip().lower().replace("_", "-")
    return norm if _LANGUAGE_CODE.match(norm) else None


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


@dataclass
class Dataset:
    """Validated utterances of one manifest with their log-mel features, and the rejects."""

    utterances: list[Utterance]
    features: dict[str, torch.Tensor]  # id -> (T, n_mels)
    rejects: list[Reject] = field(default_factory=list)
    frame_s: float = 0.01  # fbank hop

    def durations(self) -> list[float]:
        """Feature-derived durations in seconds, aligned with `utterances`."""
        return [self.features[u.id].shape[0] * self.frame_s for u in self.utterances]

    def languages(self) -> list[str]:
        """Sorted languages present."""
        return sorted({u.language for u in self.utterances})


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
        utts.append(
            Utterance(
                id=uid,
                audio=str(row["audio"]),
                duration_s=duration_s,
                language=lang,
                text=text,
                speaker=None if row.get("speaker") is None else str(row["speaker"]),
                etag=None if row.get("etag") is None else str(row["etag"]),
            )
        )
    return utts, rejects


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


def load_dataset(
    manifest_url: str,
    *,
    features: FeatureConfig,
    policy: AudioPolicy,
    require_text: bool,
    languages: Sequence[str] | None = None,
    language: str | None = None,
    on_progress: ProgressFn | None = None,
) -> Dataset:
    """Read a manifest, validate every row and decode its audio into features; bad rows become rejects.

    With `language`, only that language's rows are this dataset's (a per-language stage reading a pooled
    manifest): other languages' rows are neither loaded nor rejected.

    Raises:
        FileNotFoundError: when the manifest itself is missing.
    """
    utts, rejects = read_utterances(manifest_url, require_text=require_text, languages=languages, language=language)
    kept: list[Utterance] = []
    feats: dict[str, torch.Tensor] = {}
    for i, u in enumerate(utts):
        try:
            wav = load_audio(u.audio, policy, features.sample_rate_hz)
        except AudioError as err:
            rejects.append(Reject(u.id, u.audio, u.language, str(err), manifest_url))
        except Exception as err:  # one unreadable row must never end the run
            reason = f"unexpected error reading audio ({type(err).__name__}: {err})"
            rejects.append(Reject(u.id, u.audio, u.language, reason, manifest_url))
        else:
            feats[u.id] = log_mel(wav, features)
            kept.append(u)
        if on_progress is not None:
            on_progress(i + 1, len(utts), "decode audio")
    return Dataset(kept, feats, rejects, features.hop_ms / 1000)


def reject_untrainable(ds: Dataset, tokenizer: Tokenizer, conv_kernel: int, conv_stride: int) -> Dataset:
    """Move utterances whose transcript needs more CTC frames than the model's front end gives into the rejects."""
    kept, rejects = [], list(ds.rejects)
    for u in ds.utterances:
        tokens = tokenizer.encode(u.text or "")
        # CTC needs a frame per token plus one between each repeated pair.
        needed = len(tokens) + sum(1 for a, b in zip(tokens, tokens[1:], strict=False) if a == b)
        have = int(frames_after_subsampling(ds.features[u.id].shape[0], conv_kernel, conv_stride))
        if needed > have:
            reason = f"transcript needs {needed} CTC frames but the audio gives {have}; clip too short for its text"
            rejects.append(Reject(u.id, u.audio, u.language, reason, "tokenize"))
        else:
            kept.append(u)
    return Dataset(kept, {u.id: ds.features[u.id] for u in kept}, rejects, ds.frame_s)


class DynamicBucketSampler:
    """Batches of utterance indices by padded audio seconds from length-sorted buckets (lhotse-style).

    Each epoch's batch list is a pure function of (seed, epoch), so the state is (epoch, position).
    """

    def __init__(
        self,
        durations_s: Sequence[float],
        *,
        max_batch_duration_s: float,
        max_batch_size: int,
        num_buckets: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if not durations_s:
            raise ValueError("cannot batch an empty dataset")
        too_long = [i for i, d in enumerate(durations_s) if d > max_batch_duration_s]
        if too_long:
            raise ValueError(
                f"{len(too_long)} utterance(s) exceed max_batch_duration_s={max_batch_duration_s} "
                f"(longest {max(durations_s):.1f} s); raise the batch budget"
            )
        self.durations_s = list(durations_s)
        self.max_batch_duration_s = max_batch_duration_s
        self.max_batch_size = max_batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = sorted(range(len(self.durations_s)), key=lambda i: (self.durations_s[i], i))
        size = math.ceil(len(order) / self.num_buckets)
        batches: list[list[int]] = []
        for b in range(0, len(order), size):
            bucket = order[b : b + size]
            # Buckets are narrow in duration, so batches formed in shuffled order still pad little
            # while their composition changes every epoch.
            if self.shuffle:
                rng.shuffle(bucket)
            batch: list[int] = []
            longest = 0.0
            for i in bucket:
                d = self.durations_s[i]
                if batch and (
                    (len(batch) + 1) * max(longest, d) > self.max_batch_duration_s
                    or len(batch) >= self.max_batch_size
                ):
                    batches.append(batch)
                    batch, longest = [], 0.0
                batch.append(i)
                longest = max(longest, d)
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch."""
        return self._batches(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless batches across epochs, starting from the saved position."""
        while True:
            batches = self._batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Resumable state."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def batch_sampler(durations_s: Sequence[float], batch: BatchConfig, seed: int, shuffle: bool = True):
    """A `DynamicBucketSampler` with a stage's batch settings."""
    return DynamicBucketSampler(durations_s, max_batch_duration_s=batch.max_batch_duration_s,
                                max_batch_size=batch.max_batch_size, num_buckets=batch.num_buckets, shuffle=shuffle,
                                seed=seed)


class Batch(NamedTuple):
    """Padded tensors of one batch."""

    ids: list[str]
    feats: torch.Tensor  # (B, T, n_mels)
    feat_lens: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B, S), 0-padded
    target_lens: torch.Tensor  # (B,)
    lang_ids: torch.Tensor  # (B,)


def collate(
    utts: Sequence[Utterance],
    features: dict[str, torch.Tensor],
    *,
    tokenizer: Tokenizer | None,
    language_ids: dict[str, int],
    specaugment: SpecAugmentConfig | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Pad features (after SpecAugment, when given) and targets of a list of utterances.

    Targets are the tokenized transcripts, or `token_ids` when given (pseudo-labels are tokens already).
    """
    feats = [features[u.id] for u in utts]
    if specaugment is not None:
        feats = [spec_augment(f, specaugment) for f in feats]
    feat_lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    if token_ids is not None:
        toks = [torch.tensor(list(t), dtype=torch.long) for t in token_ids]
    elif tokenizer is not None:
        toks = [torch.tensor(tokenizer.encode(u.text or ""), dtype=torch.long) for u in utts]
    else:
        toks = [torch.zeros(0, dtype=torch.long) for _ in utts]
    target_lens = torch.tensor([t.numel() for t in toks], dtype=torch.long)
    targets = (
        torch.nn.utils.rnn.pad_sequence(toks, batch_first=True)
        if max(target_lens.tolist(), default=0) > 0
        else torch.zeros(len(utts), 0, dtype=torch.long)
    )
    lang_ids = torch.tensor([language_ids.get(u.language, -1) for u in utts], dtype=torch.long)
    return Batch([u.id for u in utts], padded, feat_lens, targets, target_lens, lang_ids)
