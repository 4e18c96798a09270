"""Mini multilingual corpus shaped like the paper's data (Sec. 4): labeled, unlabeled, dev and test.

- labeled: short single-sentence clips (2-6 s), like Common Voice, with transcripts;
- unlabeled: long clips (20-30 s, 4-8 sentences spoken as one), like VoxPopuli; their true transcripts go
  to a hidden reference file that is only used to measure pseudo-label quality;
- dev / test: short clips from held-out speakers;
- ood_short / ood_long: the out-of-domain test (the paper's LibriSpeech table): sentences from another domain
  (`text.load_ood_sentences`, never one that the in-domain text holds), spoken by other held-out speakers, as
  short clips and as 20-30 s ones; never trained or tuned on.

Speech is espeak-ng (pipeline/corpus/speech.py) over real sentences from Debian (pipeline/corpus/text.py),
passed through a random channel (pipeline/corpus/augment.py). Speakers of every language are drawn from one
shared distribution and each speaker belongs to exactly one split, so a model cannot tell the language
from the voice, and dev/test measure held-out speakers. Each split draws its speakers from its own RNG stream
and each clip has its own RNG seeded from (seed, language, split, index): the output is byte-identical for a
seed, whatever the worker count, and the eval sets do not change when another split's counts do.

`unlabeled_ratio` sets the unlabeled audio as a multiple of the labeled audio (the paper's regime: unlabeled hours
dwarf labeled ones): the labeled clips are made first, then long clips are added until each language reaches its
target.

Each finished clip leaves a JSON sidecar beside its flac (its manifest row and a key hashing everything
the clip depends on), written after the flac. A build that was killed mid-way resumes clip by clip: a
clip whose flac and sidecar exist with the same key is reused without synthesis, and the result is
byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.presets import choose
from pipeline.corpus import augment, speech
from pipeline.corpus.text import LANGUAGE_LETTERS, default_cache_dir, load_ood_sentences, load_sentences
from pipeline.data.text import normalize_text
from pipeline.layout import OOD_SPLITS, SPLITS, hidden_file, split_manifest, text_only_file
from storage.files import (
    atomic_write_bytes,
    atomic_write_text,
    exists,
    join,
    list_files,
    read_json,
    read_text,
    relative_to,
    remove,
    write_json,
)
from storage.manifest import read_manifest, write_manifest

# Bump when the audio recipe changes, so an existing corpus with the same config is rebuilt.
# 2: manifests hold audio paths relative to their folder; 3: speakers drawn per split, out-of-domain splits
BUILD_VERSION = 3
# Sentences reserved per clip: a short clip tries the next one when a sentence falls outside 2-6 s;
# a long clip skips sentences that would overshoot 30 s.
SHORT_CANDIDATES = 5
LONG_CANDIDATES = 16
# Purpose tags that keep the RNG streams of text shuffling, speakers and clips apart.
_RNG_TEXT, _RNG_SPEAKER, _RNG_CLIP, _RNG_DEAL, _RNG_OOD_TEXT = 1, 2, 3, 4, 5
# Speaker groups: one per split, the two out-of-domain splits share theirs (short and long clips differ only in
# length and text, not in voices).
SPEAKER_GROUPS = ("labeled", "unlabeled", "dev", "test", "ood")
LONG_SPLITS = ("unlabeled", "ood_long")

Range = tuple[float, float]

log = logging.getLogger("mlpl.corpus")


class CorpusConfig(BaseModel):
    """What to build: languages and their roles, clip counts per language, speakers, channel, seed."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"  # preset name, recorded in the card
    high_resource: list[str] = Field(default_factory=lambda: ["es", "de", "el"])
    low_resource: list[str] = Field(default_factory=lambda: ["sl"])
    # Clips per language and split.
    labeled_clips_high: int = 240
    labeled_clips_low: int = 40
    # Unlabeled long clips per language by role: as in the paper, some languages may have none.
    unlabeled_clips_high: int = 8
    unlabeled_clips_low: int = 8
    dev_clips: int = 24
    test_clips: int = 40
    # Unlabeled audio as a multiple of labeled audio. When set, every language whose role has unlabeled clips gets
    # long clips until it holds `unlabeled_ratio` × the larger of its own labeled seconds and the high-resource
    # languages' mean: the low-resource language gets the unlabeled hours of the others, as VoxPopuli's hours do
    # not follow Common Voice's labeled ones. None: unlabeled_clips_high/low clips.
    unlabeled_ratio: float | None = Field(None, gt=0.0)
    # The out-of-domain test per language: short clips and long (20-30 s) ones of other text, other speakers.
    ood_short_clips: int = 0
    ood_long_clips: int = 0
    # Speakers per language and split; every speaker is in exactly one split.
    labeled_speakers: int = 16
    unlabeled_speakers: int = 4
    dev_speakers: int = 4
    test_speakers: int = 6
    ood_speakers: int = 0
    # Clip shapes (seconds): Common Voice-like short clips, VoxPopuli-like long ones.
    short_clip_s: Range = (2.0, 6.0)
    long_clip_s: Range = (20.0, 30.0)
    sentences_per_long_clip: tuple[int, int] = (4, 8)
    pause_s: Range = (0.2, 0.6)
    padding_s: Range = (0.1, 0.3)
    sample_rate: int = 16000
    # Speaker distribution, shared by every language.
    pitch: tuple[int, int] = (30, 70)  # espeak base pitch, 0-100
    pitch_range: tuple[int, int] = (25, 85)  # espeak intonation range, 0-100
    rate_wpm: tuple[int, int] = (145, 190)  # espeak words per minute (default 175)
    tilt: Range = (-0.6, 0.6)  # first-order tilt coefficient: < 0 muffled, > 0 bright
    # Channel. SNR 10-30 dB rather than 5-25: the tiny model must learn from this in minutes.
    snr_db: Range = (10.0, 30.0)
    reverb_prob: float = 0.5
    rt60_s: Range = (0.2, 0.8)
    direct_to_reverb_db: Range = (0.0, 10.0)
    level_dbfs: Range = (-32.0, -18.0)
    seed: int = 0
    num_workers: int = 2  # build parallelism only: the output is identical for any value

    @model_validator(mode="after")
    def _check(self) -> CorpusConfig:
        errors = []
        languages = self.high_resource + self.low_resource
        if not languages:
            errors.append("no languages: set high_resource and/or low_resource")
        if len(set(languages)) != len(languages):
            errors.append(f"languages repeat or are both high and low resource: {languages}")
        for lang in languages:
            if lang not in LANGUAGE_LETTERS:
                errors.append(f"language {lang!r} has no alphabet table (supported: {sorted(LANGUAGE_LETTERS)})")
            elif not speech.has_voice(lang):
                errors.append(f"espeak-ng ships no voice for language {lang!r}")
        for field in (
            "labeled_clips_high",
            "labeled_clips_low",
            "unlabeled_clips_high",
            "unlabeled_clips_low",
            "dev_clips",
            "test_clips",
            "ood_short_clips",
            "ood_long_clips",
        ):
            if getattr(self, field) < 0:
                errors.append(f"{field} must be >= 0, got {getattr(self, field)}")
        for split in SPLITS:
            clips = self.clips(split, "high") + self.clips(split, "low")
            if clips and getattr(self, f"{speaker_group(split)}_speakers") < 1:
                errors.append(f"{speaker_group(split)}_speakers must be >= 1 when the split {split} has clips")
        for field in (
            "short_clip_s",
            "long_clip_s",
            "sentences_per_long_clip",
            "pause_s",
            "padding_s",
            "pitch",
            "pitch_range",
            "rate_wpm",
            "tilt",
            "snr_db",
            "rt60_s",
            "direct_to_reverb_db",
            "level_dbfs",
        ):
            lo, hi = getattr(self, field)
            if lo > hi:
                errors.append(f"{field} is an empty range: {lo} > {hi}")
        if self.sentences_per_long_clip[0] < 1:
            errors.append("sentences_per_long_clip must start at >= 1")
        if self.rt60_s[0] <= 0:
            errors.append("rt60_s must be > 0")
        if not 0.0 <= self.reverb_prob <= 1.0:
            errors.append(f"reverb_prob must be in [0, 1], got {self.reverb_prob}")
        if self.level_dbfs[1] > -1.0:
            errors.append("level_dbfs must stay below -1 dBFS so speech does not clip")
        if self.sample_rate <= 0:
            errors.append(f"sample_rate must be > 0, got {self.sample_rate}")
        if self.seed < 0:
            errors.append(f"seed must be >= 0, got {self.seed}")
        if self.num_workers < 1:
            errors.append(f"num_workers must be >= 1, got {self.num_workers}")
        if errors:
            raise ValueError("invalid CorpusConfig:\n- " + "\n- ".join(errors))
        return self

    @property
    def languages(self) -> list[str]:
        """All languages, high-resource first."""
        return self.high_resource + self.low_resource

    def role(self, language: str) -> str:
        """'high' or 'low' resource."""
        return "high" if language in self.high_resource else "low"

    def clips(self, split: str, role: str) -> int:
        """Clips per language of a split for a resource role (unlabeled: before `unlabeled_ratio` adds any)."""
        if split == "labeled":
            return self.labeled_clips_high if role == "high" else self.labeled_clips_low
        if split == "unlabeled":
            return self.unlabeled_clips_high if role == "high" else self.unlabeled_clips_low
        return {"dev": self.dev_clips, "test": self.test_clips, "ood_short": self.ood_short_clips,
                "ood_long": self.ood_long_clips}[split]


def speaker_group(split: str) -> str:
    """The speaker group a split's clips are spoken by (the out-of-domain splits share one)."""
    return "ood" if split in OOD_SPLITS else split


def smoke() -> CorpusConfig:
    """Tiny 3-language corpus (es, el high; sl low) for tests, with out-of-domain clips: builds in seconds."""
    return CorpusConfig(
        name="smoke",
        high_resource=["es", "el"],
        low_resource=["sl"],
        labeled_clips_high=40,
        labeled_clips_low=12,
        unlabeled_clips_high=2,
        unlabeled_clips_low=6,  # enough for a tiny slimIPL run on sl in the tests
        dev_clips=6,
        test_clips=4,
        ood_short_clips=2,
        ood_long_clips=1,
        labeled_speakers=15,  # enough voices that LID generalizes to held-out speakers
        unlabeled_speakers=2,
        dev_speakers=3,
        test_speakers=2,
        ood_speakers=2,
        num_workers=1,  # a second worker's torch import costs more than it saves on ~70 clips
    )


def demo() -> CorpusConfig:
    """`make demo` corpus: es, de, el high (240 labeled), sl low (40 labeled, 160 x 20-30 s unlabeled); a small
    out-of-domain test (16 short, 6 long clips per language)."""
    return CorpusConfig(
        name="demo",
        high_resource=["es", "de", "el"],
        low_resource=["sl"],
        labeled_clips_high=240,
        labeled_clips_low=40,
        # Only sl has unlabeled audio: ≈ 4000 s against its ≈ 160 s labeled (25×); a calibration probe found
        # no self-training gain at 6× and some at 30×.
        unlabeled_clips_high=0,
        unlabeled_clips_low=160,
        dev_clips=24,
        test_clips=40,
        ood_short_clips=16,
        ood_long_clips=6,
        labeled_speakers=16,
        unlabeled_speakers=4,
        dev_speakers=4,
        test_speakers=6,
        ood_speakers=4,
    )


def bench() -> CorpusConfig:
    """Benchmark corpus in the paper's regime: es, de, el, it, fr high (150 labeled clips, ≈ 0.17 h), sl low (30);
    every language 10× a high-resource language's labeled hours of 20-30 s unlabeled clips from 40 speakers; an
    out-of-domain test of 40 short and 20 long clips per language."""
    return CorpusConfig(
        name="bench",
        high_resource=["es", "de", "el", "it", "fr"],
        low_resource=["sl"],
        labeled_clips_high=150,
        labeled_clips_low=30,
        unlabeled_clips_high=40,  # at least; unlabeled_ratio adds clips until each language has 10×
        unlabeled_clips_low=40,
        unlabeled_ratio=10.0,
        dev_clips=20,
        test_clips=50,
        ood_short_clips=40,
        ood_long_clips=20,
        labeled_speakers=16,
        unlabeled_speakers=40,
        dev_speakers=4,
        test_speakers=8,
        ood_speakers=8,
    )


_PRESETS: dict[str, Callable[[], CorpusConfig]] = {"smoke": smoke, "demo": demo, "bench": bench}


def corpus_preset(name: str) -> CorpusConfig:
    """The named preset's config.

    Raises:
        ValueError: the name is not a preset.
    """
    return choose(_PRESETS, "corpus preset", name)()


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: espeak voice settings plus a personal channel tilt, in one split."""

    id: str
    language: str
    split: str
    voice: speech.VoiceSettings
    tilt: float


@dataclass(frozen=True)
class ClipJob:
    """Everything a worker needs to make one clip, with no reference to the config object."""

    id: str
    split: str
    language: str
    index: int
    speaker: Speaker
    candidates: tuple[str, ...]
    audio_url: str
    rng_key: tuple[int, ...]
    sample_rate: int
    clip_s: Range
    sentences: tuple[int, int]  # (1, 1) for short clips
    pause_s: Range
    padding_s: Range
    channel: augment.ChannelSettings


@dataclass(frozen=True)
class Text:
    """The sentences a build speaks, per language: the in-domain pool, the out-of-domain one (languages of a config
    with out-of-domain clips), and where each came from (the card and the corpus identity record it)."""

    sentences: dict[str, list[str]]
    ood: dict[str, list[str]]
    sources: dict[str, dict]


def _rng(seed: int, purpose: int, language: str, *ints: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *ints, *language.encode("utf-8")])


def draw_speakers(cfg: CorpusConfig, language: str) -> dict[str, list[Speaker]]:
    """The language's speakers per group (SPEAKER_GROUPS), all drawn from the one distribution the config defines,
    each group from its own RNG stream: a group's voices do not depend on any other group's size.

    Voice variants are dealt like cards, from a fresh shuffle of all variants per round, rather than drawn
    independently: each group of each language then uses every variant about equally, so no variant is more
    common in one language than another and a voice never hints at the language.
    """
    variants = speech.VOICE_VARIANTS
    out: dict[str, list[Speaker]] = {}
    for g, group in enumerate(SPEAKER_GROUPS):
        out[group] = []
        for i in range(getattr(cfg, f"{group}_speakers")):
            deal = _rng(cfg.seed, _RNG_DEAL, language, g, i // len(variants)).permutation(len(variants))
            rng = _rng(cfg.seed, _RNG_SPEAKER, language, g, i)
            voice = speech.VoiceSettings(
                variant=variants[int(deal[i % len(variants)])],
                pitch=int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)),
                pitch_range=int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1)),
                rate_wpm=int(rng.integers(cfg.rate_wpm[0], cfg.rate_wpm[1] + 1)),
            )
            tilt = round(float(rng.uniform(*cfg.tilt)), 3)
            out[group].append(Speaker(f"{language}-spk-{group}{i:03d}", language, group, voice, tilt))
    return out


def _cut(pool: list[str], counts: dict[str, int], language: str) -> tuple[dict[str, list[tuple[str, ...]]], int]:
    """Consecutive candidate blocks of `pool` per split, in the order of `counts` (clips per split); where they end.

    Raises:
        ValueError: too few sentences for the requested clips.
    """
    size = {split: LONG_CANDIDATES if split in LONG_SPLITS else SHORT_CANDIDATES for split in counts}
    need = sum(counts[split] * size[split] for split in counts)
    if len(pool) < need:
        raise ValueError(
            f"language {language!r} has {len(pool)} usable sentences for {', '.join(counts)} but this config needs "
            f"{need} ({SHORT_CANDIDATES} per short clip, {LONG_CANDIDATES} per long clip): add sentences or lower "
            "the clip counts"
        )
    blocks, start = {}, 0
    for split, n in counts.items():
        k = size[split]
        blocks[split] = [tuple(pool[start + i * k : start + (i + 1) * k]) for i in range(n)]
        start += k * n
    return blocks, start


def allocate_sentences(cfg: CorpusConfig, language: str, sentences: list[str], *, unlabeled_clips: int | None = None,
                       ood_sentences: list[str] | None = None) -> dict[str, list[tuple[str, ...]]]:
    """Disjoint candidate blocks per clip: shuffled once per (seed, language), then cut as test, dev, labeled,
    unlabeled, so the eval sets stay put when any count changes and the labeled data stays put when the
    unlabeled budget (`unlabeled_clips`, default the config's) changes. The out-of-domain splits are cut the same
    way from `ood_sentences` less every sentence of the in-domain pool (compared normalized).

    Raises:
        ValueError: too few sentences for the requested clips.
    """
    role = cfg.role(language)
    counts = {split: cfg.clips(split, role) for split in ("test", "dev", "labeled", "unlabeled")}  # cutting order
    counts["unlabeled"] = counts["unlabeled"] if unlabeled_clips is None else unlabeled_clips
    order = _rng(cfg.seed, _RNG_TEXT, language).permutation(len(sentences))
    pool = [sentences[i] for i in order]
    blocks, end = _cut(pool, counts, language)
    # The text-only split: what no clip's candidates reserved (never a clip's sentence, of any split), for LMs.
    used = {sentence for split_blocks in blocks.values() for block in split_blocks for sentence in block}
    blocks["text"] = [tuple(s for s in pool[end:] if s not in used)]
    ood_counts = {split: cfg.clips(split, role) for split in OOD_SPLITS}
    if not any(ood_counts.values()):
        return blocks | {split: [] for split in OOD_SPLITS}
    in_domain = {normalize_text(s) for s in sentences}
    other = [s for s in ood_sentences or [] if normalize_text(s) not in in_domain]
    order = _rng(cfg.seed, _RNG_OOD_TEXT, language).permutation(len(other))
    ood, _ = _cut([other[i] for i in order], ood_counts, language)
    return blocks | ood


def _write_text_only(cfg: CorpusConfig, out_dir: str, text: Text, unlabeled: dict[str, int]) -> None:
    # Written on every build, also of a finished corpus: it is cheap, and corpora built before it existed get it.
    for language in cfg.languages:
        blocks = allocate_sentences(cfg, language, text.sentences[language], unlabeled_clips=unlabeled[language],
                                    ood_sentences=text.ood.get(language))
        lines = "\n".join(blocks["text"][0]) + "\n"
        url = text_only_file(out_dir, language)
        if not exists(url) or read_text(url) != lines:
            atomic_write_text(url, lines)


def _plan(cfg: CorpusConfig, out_dir: str, text: Text,
          unlabeled: dict[str, int]) -> tuple[list[ClipJob], list[Speaker]]:
    channel = augment.ChannelSettings(
        snr_db=cfg.snr_db,
        reverb_prob=cfg.reverb_prob,
        rt60_s=cfg.rt60_s,
        direct_to_reverb_db=cfg.direct_to_reverb_db,
        level_dbfs=cfg.level_dbfs,
    )
    jobs: list[ClipJob] = []
    speakers: list[Speaker] = []
    for language in cfg.languages:
        by_group = draw_speakers(cfg, language)
        speakers += [s for group in SPEAKER_GROUPS for s in by_group[group]]
        blocks = allocate_sentences(cfg, language, text.sentences[language], unlabeled_clips=unlabeled[language],
                                    ood_sentences=text.ood.get(language))
        for split_index, split in enumerate(SPLITS):
            long = split in LONG_SPLITS
            voices = by_group[speaker_group(split)]
            for index, candidates in enumerate(blocks[split]):
                clip_id = f"{language}-{split}-{index:06d}"
                jobs.append(
                    ClipJob(
                        id=clip_id,
                        split=split,
                        language=language,
                        index=index,
                        speaker=voices[index % len(voices)],
                        candidates=candidates,
                        audio_url=join(out_dir, "audio", split, language, f"{clip_id}.flac"),
                        rng_key=(cfg.seed, _RNG_CLIP, split_index, index, *language.encode("utf-8")),
                        sample_rate=cfg.sample_rate,
                        clip_s=cfg.long_clip_s if long else cfg.short_clip_s,
                        sentences=cfg.sentences_per_long_clip if long else (1, 1),
                        pause_s=cfg.pause_s,
                        padding_s=cfg.padding_s,
                        channel=channel,
                    )
                )
    return jobs, speakers


def _speak(job: ClipJob, text: str, rng: np.random.Generator) -> np.ndarray:
    """One sentence at the corpus rate with leading/trailing silence cut."""
    pcm = speech.synthesize(text, job.language, job.speaker.voice, int(rng.integers(1, 2**31 - 1)))
    audio = augment.resample(pcm.astype(np.float32) / 32768.0, speech.engine_sample_rate(), job.sample_rate)
    return augment.trim_silence(audio, job.sample_rate)


def _compose(job: ClipJob, rng: np.random.Generator) -> tuple[list[str], list[np.ndarray]] | str:
    """Pick sentences and silences for a clip within its duration range; a reason string when impossible."""
    lo, hi = job.clip_s
    min_n, max_n = job.sentences
    sr = job.sample_rate
    lead, tail = (int(rng.uniform(*job.padding_s) * sr) for _ in range(2))
    target = rng.uniform(lo, hi)  # long clips: stop adding sentences once past a drawn length
    texts: list[str] = []
    pieces: list[np.ndarray] = [np.zeros(lead, np.float32)]
    total = lead + tail
    for text in job.candidates:
        if len(texts) == max_n:
            break
        speech = _speak(job, text, rng)
        pause = np.zeros(int(rng.uniform(*job.pause_s) * sr) if texts else 0, np.float32)
        if total + len(pause) + len(speech) > hi * sr:
            continue  # too long for what is left of this clip: try the next candidate
        if max_n == 1 and total + len(speech) < lo * sr:
            continue  # a short clip under the minimum: try the next candidate
        texts.append(text)
        pieces += [pause, speech]
        total += len(pause) + len(speech)
        if len(texts) >= min_n and total >= min(target, hi) * sr:
            break
    if not texts or len(texts) < min_n or total < lo * sr:
        return f"no fit within {lo}-{hi} s from {len(job.candidates)} candidate sentences"
    pieces.append(np.zeros(tail, np.float32))
    return texts, pieces


def _sidecar_url(audio_url: str) -> str:
    return audio_url[: -len(".flac")] + ".json"


def clip_key(job: ClipJob) -> str:
    """Hash of everything a clip's audio and row depend on, except where it is written."""
    fields = asdict(job)
    del fields["audio_url"]
    blob = {"build_version": BUILD_VERSION, "engine": speech.engine_version(), "job": fields}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def make_clip(job: ClipJob) -> dict:
    """Synthesize, corrupt and write one clip; return its manifest row, or a reject with the reason.

    The sidecar goes first and comes back last, after the flac: a sidecar never vouches for audio that
    a later, interrupted build may have overwritten.
    """
    sidecar = _sidecar_url(job.audio_url)
    remove(sidecar)
    rng = np.random.default_rng(list(job.rng_key))
    composed = _compose(job, rng)
    if isinstance(composed, str):
        return {"id": job.id, "split": job.split, "language": job.language, "reject": composed}
    texts, pieces = composed
    clean = np.concatenate(pieces)
    tilt = job.speaker.tilt + float(rng.uniform(-0.1, 0.1))  # the same speaker on a slightly different day
    audio, channel = augment.corrupt(clean, job.sample_rate, rng, job.channel, tilt)
    pcm = augment.to_int16(audio)
    buf = io.BytesIO()
    sf.write(buf, pcm, job.sample_rate, format="FLAC", subtype="PCM_16")
    atomic_write_bytes(job.audio_url, buf.getvalue())
    text = " ".join(texts)
    row = {
        "id": job.id,
        "split": job.split,
        "audio": job.audio_url,
        "duration_s": round(len(pcm) / job.sample_rate, 3),
        "language": job.language,
        "speaker": job.speaker.id,
        "text": text,
        "text_normalized": normalize_text(text),
        "sentences": texts,
        "channel": channel,
    }
    # The row without its absolute path, so the sidecar is the same wherever the corpus lives.
    write_json(sidecar, {"key": clip_key(job), "row": {**row, "audio": f"{job.id}.flac"}})
    return row


def _reusable(jobs: list[ClipJob], out_dir: str) -> dict[str, dict]:
    """Rows of the clips a previous (possibly interrupted) build already made for this very job."""
    present = set(list_files(join(out_dir, "audio"), "*/*/*"))
    out: dict[str, dict] = {}
    for job in jobs:
        sidecar = _sidecar_url(job.audio_url)
        if job.audio_url not in present or sidecar not in present:
            continue
        try:
            saved = read_json(sidecar)
            row = saved["row"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: make the clip again
        if saved.get("key") == clip_key(job) and row.get("id") == job.id:
            out[job.id] = {**row, "audio": job.audio_url}
    return out


def _worker_init() -> None:
    # One torch thread per worker: FFT results depend on the thread count, so pinning it keeps the audio
    # identical everywhere; two workers already fill two cores.
    import torch

    torch.set_num_threads(1)


def _run_jobs(
    jobs: list[ClipJob],
    num_workers: int,
    on_progress: Callable[[int, int, str], None] | None,
    reused: dict[str, dict] | None = None,
) -> dict[str, dict]:
    results: dict[str, dict] = {}
    total = len(jobs)
    reused = reused or {}
    # Clips kept from an earlier build count as done and are reported first.
    for job in jobs:
        if job.id in reused:
            results[job.id] = reused[job.id]
            if on_progress is not None:
                on_progress(len(results), total, "reused")
    # Long clips first: they take longest, so the pool finishes evenly.
    todo = [j for j in jobs if j.id not in reused]
    ordered = sorted(todo, key=lambda j: (j.split != "unlabeled", j.split, j.language, j.index))
    if not ordered:
        return results

    def done(result: dict) -> None:
        results[result["id"]] = result
        if on_progress is not None:
            on_progress(len(results), total, f"{result['split']} {result['language']}")

    # Clips always run in worker processes pinned to one torch thread: FFT results depend on the thread
    # count, and the caller's setting must not change the audio. spawn, not fork: the caller may hold
    # torch/OpenMP threads that a forked pool would inherit broken.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(make_clip, job) for job in ordered]
        for future in cf.as_completed(futures):
            done(future.result())
    return results


def build_corpus(
    cfg: CorpusConfig,
    out_dir: str,
    *,
    text_dir: str | None = None,
    cache_dir: str | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Build the corpus into out_dir (audio, manifests, hidden reference, card) and return the card.

    A rebuild with the same config and text into a complete out_dir returns the existing card at once.
    Otherwise clips that an earlier build (even a killed one) left for the very same job are reused
    (flac plus sidecar, see make_clip) and only the others are synthesized; the output is the same as
    a fresh build's, byte for byte.

    Raises:
        FileNotFoundError: text_dir lacks a language's sentence file.
        RuntimeError: the Debian text cannot be fetched (see --text-dir).
        ValueError: too few sentences for the requested clips.
    """
    if "://" not in out_dir:
        out_dir = os.path.abspath(out_dir)
    text = _load_text(cfg, cache_dir or default_cache_dir(), text_dir)
    identity = _identity(cfg, text.sources)
    card_url = join(out_dir, "corpus_card.json")
    if exists(card_url):
        card = read_json(card_url)
        if card.get("identity") == identity and _complete(out_dir):
            _write_text_only(cfg, out_dir, text, card["unlabeled_clips_planned"])
            return card
    # The card marks a finished corpus: drop it before touching any clip, so that an interrupted build
    # is never taken for a complete one.
    remove(card_url)
    remove(join(out_dir, "corpus_card.md"))

    def run(jobs: list[ClipJob]) -> dict[str, dict]:
        reused = _reusable(jobs, out_dir)
        if reused:
            log.info("corpus %s: reusing %d of %d clips from an earlier build", out_dir, len(reused), len(jobs))
        return _run_jobs(jobs, cfg.num_workers, on_progress, reused)

    unlabeled = _unlabeled_clips(cfg, out_dir, text, run)
    _write_text_only(cfg, out_dir, text, unlabeled)
    jobs, speakers = _plan(cfg, out_dir, text, unlabeled)
    results = run(jobs)
    rows = [results[job.id] for job in jobs]  # plan order: split, language, index
    _write_manifests(out_dir, rows)
    ok = [r["audio"] for r in rows if "reject" not in r]
    _remove_stale_audio(out_dir, set(ok) | {_sidecar_url(a) for a in ok})
    card = _card(cfg, out_dir, identity, rows, speakers, text.sources) | {"unlabeled_clips_planned": unlabeled}
    write_json(card_url, card)
    atomic_write_text(join(out_dir, "corpus_card.md"), card_markdown(card))
    return card


def _load_text(cfg: CorpusConfig, cache_dir: str, text_dir: str | None) -> Text:
    """Every language's sentence pools (the out-of-domain one only when the config has out-of-domain clips)."""
    sentences, ood, sources = {}, {}, {}
    wants_ood = cfg.ood_short_clips + cfg.ood_long_clips > 0
    for language in cfg.languages:
        sentences[language], sources[language] = load_sentences(language, cache_dir=cache_dir, text_dir=text_dir)
        if wants_ood:
            ood[language], sources[language]["ood"] = load_ood_sentences(language, cache_dir=cache_dir,
                                                                          text_dir=text_dir)
    return Text(sentences, ood, sources)


def _seconds(rows: Iterable[dict], split: str) -> Counter[str]:
    """Audio seconds per language of a split's made clips."""
    out: Counter[str] = Counter()
    for r in rows:
        if r["split"] == split and "reject" not in r:
            out[r["language"]] += r["duration_s"]
    return out


def _unlabeled_clips(cfg: CorpusConfig, out_dir: str, text: Text,
                     run: Callable[[list[ClipJob]], dict[str, dict]]) -> dict[str, int]:
    """Long unlabeled clips per language: the config's counts, or with `unlabeled_ratio` as many as it takes to
    reach the ratio (the labeled clips are made first to measure their seconds, then unlabeled ones until every
    language has its target; clips only ever get added, so the ones made stay valid).

    Raises:
        RuntimeError: when added clips add no audio (every one rejected).
    """
    counts = {lang: cfg.clips("unlabeled", cfg.role(lang)) for lang in cfg.languages}
    if cfg.unlabeled_ratio is None:
        return counts
    jobs, _ = _plan(cfg, out_dir, text, counts)
    labeled = _seconds(run([j for j in jobs if j.split == "labeled"]).values(), "labeled")
    high = [labeled[lang] for lang in cfg.high_resource]
    mean_high = sum(high) / len(high) if high else 0.0
    target = {lang: cfg.unlabeled_ratio * max(labeled[lang], mean_high) for lang, n in counts.items() if n}
    mean_long_s = sum(cfg.long_clip_s) / 2
    counts |= {lang: max(counts[lang], math.ceil(t / mean_long_s)) for lang, t in target.items()}
    made: Counter[str] = Counter()
    while True:
        jobs, _ = _plan(cfg, out_dir, text, counts)
        before, made = made, _seconds(run([j for j in jobs if j.split == "unlabeled"]).values(), "unlabeled")
        short = {lang: t - made[lang] for lang, t in target.items() if made[lang] < t}
        if not short:
            log.info("corpus %s: unlabeled clips for %gx the labeled audio: %s", out_dir, cfg.unlabeled_ratio, counts)
            return counts
        if made == before:
            raise RuntimeError(f"unlabeled clips added for {sorted(short)} hold no audio (every one rejected)")
        counts |= {lang: counts[lang] + math.ceil(deficit / mean_long_s) for lang, deficit in short.items()}


def _identity(cfg: CorpusConfig, text_sources: dict[str, dict]) -> dict:
    # num_workers changes nothing in the output, so it does not invalidate a finished corpus.
    config = cfg.model_dump(mode="json", exclude={"num_workers"})
    return {"build_version": BUILD_VERSION, "config": config, "text": text_sources}


def _complete(out_dir: str) -> bool:
    manifests = [split_manifest(out_dir, s) for s in SPLITS]
    manifests.append(hidden_file(out_dir, "unlabeled_reference.jsonl"))
    if not all(exists(m) for m in manifests):
        return False
    for manifest in manifests[: len(SPLITS)]:
        rows, rejects = read_manifest(manifest)
        if rejects or not all(exists(r["audio"]) for r in rows):
            return False
    return True


def _remove_stale_audio(out_dir: str, keep: set[str]) -> None:
    # A rebuild with another config must not leave clips (flacs, sidecars) of the old one lying beside
    # the new manifests.
    for pattern in ("*/*/*.flac", "*/*/*.json"):
        for url in list_files(join(out_dir, "audio"), pattern):
            if url not in keep:
                remove(url)


def _write_manifests(out_dir: str, rows: list[dict]) -> None:
    ok = [r for r in rows if "reject" not in r]
    for split in SPLITS:
        split_rows = [r for r in ok if r["split"] == split]
        keep = ("id", "audio", "duration_s", "language", "speaker")
        if split != "unlabeled":
            keep += ("text", "text_normalized")
        # Audio paths relative to the manifests' folder: the corpus folder can be moved or uploaded whole.
        folder = join(out_dir, "manifests")
        write_manifest(split_manifest(out_dir, split),
                       [{k: r[k] for k in keep} | {"audio": relative_to(r["audio"], folder)} for r in split_rows])
    # The hidden truth of the unlabeled clips, with the sentence boundaries for finer analysis.
    reference = [
        {k: r[k] for k in ("id", "language", "text", "text_normalized", "sentences")}
        for r in ok
        if r["split"] == "unlabeled"
    ]
    write_manifest(hidden_file(out_dir, "unlabeled_reference.jsonl"), reference)
    # What the channel did to each clip (SNR, noise colour, reverb): for analysing errors, not for training.
    channel = [{"id": r["id"], "split": r["split"], "speaker": r["speaker"], **r["channel"]} for r in ok]
    write_manifest(hidden_file(out_dir, "channel.jsonl"), channel)


def _card(
    cfg: CorpusConfig, out_dir: str, identity: dict, rows: list[dict], speakers: list[Speaker], text: dict
) -> dict:
    ok = [r for r in rows if "reject" not in r]
    splits: dict[str, dict] = {}
    for split in SPLITS:
        splits[split] = {}
        for language in cfg.languages:
            mine = [r for r in ok if r["split"] == split and r["language"] == language]
            seconds = sum(r["duration_s"] for r in mine)
            splits[split][language] = {
                "clips": len(mine),
                "hours": round(seconds / 3600, 4),
                "mean_duration_s": round(seconds / len(mine), 2) if mine else 0.0,
                "speakers": len({r["speaker"] for r in mine}),
                "reverb_fraction": round(sum(r["channel"]["reverb"] for r in mine) / len(mine), 2) if mine else 0.0,
            }
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "sample_rate": cfg.sample_rate,
        "languages": {
            lang: {
                "role": cfg.role(lang),
                "espeak_voice": speech.espeak_voice(lang),
                "text_source": text[lang],
            }
            for lang in cfg.languages
        },
        "splits": splits,
        "speakers": [
            {"id": s.id, "language": s.language, "split": s.split, **asdict(s.voice), "tilt": s.tilt} for s in speakers
        ],
        "channel": {
            "snr_db": list(cfg.snr_db),
            "noise": list(augment.NOISE_COLORS),
            "reverb_prob": cfg.reverb_prob,
            "rt60_s": list(cfg.rt60_s),
            "direct_to_reverb_db": list(cfg.direct_to_reverb_db),
            "level_dbfs": list(cfg.level_dbfs),
            "tilt": list(cfg.tilt),
        },
        "speech": {
            "engine": f"espeak-ng {speech.engine_version()} (espeakng-loader wheel)",
            "engine_sample_rate": speech.engine_sample_rate(),
            "voice_variants": list(speech.VOICE_VARIANTS),
        },
        "files": {
            **{split: split_manifest(out_dir, split) for split in SPLITS},
            "unlabeled_reference": hidden_file(out_dir, "unlabeled_reference.jsonl"),
        },
        "rejects": [{"id": r["id"], "reason": r["reject"]} for r in rows if "reject" in r],
        "identity": identity,
    }


def card_markdown(card: dict) -> str:
    """Human-readable corpus card."""
    langs = list(card["languages"])
    lines = [
        f"# mlpl corpus `{card['name']}` (seed {card['seed']})",
        "",
        "Synthetic multilingual speech (espeak-ng) over real sentences from Debian packages; "
        "shaped like the paper's data: short labeled clips, long unlabeled clips (transcripts hidden), "
        "dev/test from held-out speakers.",
        "",
        "## Languages",
        "",
        "| language | role | espeak voice | text source | sentences |",
        "|---|---|---|---|---|",
    ]
    for lang, info in card["languages"].items():
        src = info["text_source"]
        where = f"{src['package']} {src['version']}" if src.get("source") == "debian" else src.get("path", "")
        lines.append(f"| {lang} | {info['role']} | {info['espeak_voice']} | {where} | {src.get('sentences')} |")
    lines += [
        "",
        "## Splits (clips / hours / speakers)",
        "",
        "| split | " + " | ".join(langs) + " |",
        "|---|" + "---|" * len(langs),
    ]
    for split, per_lang in card["splits"].items():
        cells = [f"{v['clips']} / {v['hours']:.3f} h / {v['speakers']}" for v in per_lang.values()]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    ch = card["channel"]
    lines += [
        "",
        "## Channel",
        "",
        f"SNR {ch['snr_db'][0]}-{ch['snr_db'][1]} dB ({', '.join(ch['noise'])} noise); reverb on "
        f"{ch['reverb_prob']:.0%} of clips, RT60 {ch['rt60_s'][0]}-{ch['rt60_s'][1]} s; level "
        f"{ch['level_dbfs'][0]} to {ch['level_dbfs'][1]} dBFS; tilt {ch['tilt'][0]} to {ch['tilt'][1]}.",
        "",
        f"Speech: {card['speech']['engine']}. Rejected clips: {len(card['rejects'])}.",
        "",
        "## Speakers",
        "",
        "| id | split | variant | pitch | range | rate (wpm) | tilt |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in card["speakers"]:
        lines.append(
            f"| {s['id']} | {s['split']} | {s['variant']} | {s['pitch']} | {s['pitch_range']} | "
            f"{s['rate_wpm']} | {s['tilt']} |"
        )
    return "\n".join(lines) + "\n"


def read_card(out_dir: str) -> dict:
    """The corpus card of a built corpus."""
    return read_json(join(out_dir, "corpus_card.json"))


def card_summary(card: dict) -> str:
    """One line per split: clips and hours over all languages."""
    parts = []
    for split, per_lang in card["splits"].items():
        clips = sum(v["clips"] for v in per_lang.values())
        hours = sum(v["hours"] for v in per_lang.values())
        parts.append(f"{split}: {clips} clips, {hours:.2f} h")
    return json.dumps(card["name"]) + " — " + "; ".join(parts)
